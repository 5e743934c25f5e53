"""``GET /voip/events`` over a real listening Site on 127.0.0.1 (port 0), read by a raw
HTTP client: sign-in, the wire format, permissions, Last-Event-ID replay (header and
query), reload, heartbeats (a Clock), the maximum of streams, shutdown."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dpvoip.click_to_call.logins import Logins
from dpvoip.config import DatabaseSettings, Secret, WebSettings
from dpvoip.live.events import LiveEvent
from dpvoip.live.hub import Hub
from dpvoip.store.accounts import Accounts
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.live import LiveEvents
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from dpvoip.store.tokens import create_token
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.events import EventStreams
from dpvoip.web.server import DpvoipSite
from test.support.crm import Crm
from test.support.daemon import PATIENCE
from test.support.postgres import postgres
from test.support.waiting import until


class RawClient(Protocol):
    """Sends one request and keeps every byte of the answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    @property
    def head(self) -> str:
        return self.received.split(b"\r\n\r\n", 1)[0].decode("latin-1")

    @property
    def body(self) -> bytes:
        """The stream's bytes, chunk framing removed."""
        rest = self.received.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.received else b""
        out = b""
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            if not size:
                break
            n = int(size, 16)
            out += rest[:n]
            rest = rest[n + 2:]
        return out

    def events(self) -> list[tuple[str | None, str, Any]]:
        found = []
        for block in self.body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.split("\n")
                          if ": " in line and not line.startswith(":"))
            if "data" in fields:
                found.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
        return found


class StreamTests(TestCase):
    timeout = 2 * PATIENCE  # a hang detector

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 2)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        self.clock = Clock()
        self.hub = Hub(self.clock, max_streams=3, heartbeat=15)
        logins = Logins(Accounts(self.store, "public"), Secret("crm-secret"), Secret(""),
                        "sessionid", reactor)
        app = WebApp(self.ready, "test",
                     events=EventStreams(logins, LiveEvents(self.store, "public"), self.hub))
        site = DpvoipSite(app.resource(), WebSettings(), reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port  # type: ignore[attr-defined]
        self.clients: list[RawClient] = []

        async def ready() -> None:
            await pool.start()
            await self.store.write(lambda c: prepare(c, standalone=False, crm_schema="public"))
            self.boss = await self.token("boss", is_staff=True)
            self.anna = await self.token("anna", is_staff=False)
            self.crm.insert("voip_connection", type="pbx", active=True, number="100",
                            callerid="Anna", provider="Zadarma",
                            owner_id=self.crm.query("SELECT id FROM auth_user WHERE"
                                                    " username = 'anna'")[0][0])

        return defer.Deferred.fromCoroutine(ready())

    def tearDown(self) -> Any:
        self.hub.close_all()
        for client in self.clients:
            self.hang_up(client)
        return defer.gatherResults([c.closed for c in self.clients])

    def ready(self) -> defer.Deferred[Readiness]:
        return defer.succeed(Readiness(True))

    async def token(self, username: str, **values: Any) -> str:
        self.crm.user(username, **values)
        _, token = await create_token(self.store, "public", username)
        return token

    def get(self, token: str | None = None, path: str = "/voip/events",
            headers: dict[str, str] | None = None) -> RawClient:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        client = RawClient(("\r\n".join(lines) + "\r\n\r\n").encode())
        factory = ClientFactory()
        factory.buildProtocol = lambda addr: client  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", self.port, factory)
        self.clients.append(client)
        return client

    async def opened(self, client: RawClient) -> None:
        await until(lambda: b"retry: 3000" in client.body)

    def kept(self, kind: str, data: dict[str, Any], legs: list[str] | None = None) -> int:
        [(ident,)] = self.crm.query(
            "INSERT INTO dpvoip.live_event (kind, call_id, legs, data) VALUES"
            " (%s, %s, %s, %s) RETURNING id",
            (kind, data.get("call_id"), legs or [], json.dumps(data)))
        return int(ident)

    @defer.inlineCallbacks
    def test_without_a_login_401_with_a_bad_last_event_id_400(self) -> Any:
        refused = self.get()
        yield defer.Deferred.fromCoroutine(until(lambda: b"\r\n\r\n" in refused.received))
        self.assertIn("HTTP/1.1 401", refused.head)
        bad = self.get(self.boss, headers={"Last-Event-ID": "yesterday"})
        yield defer.Deferred.fromCoroutine(until(lambda: b"\r\n\r\n" in bad.received))
        self.assertIn("HTTP/1.1 400", bad.head)
        self.assertEqual(self.hub.open_streams, 0)

    @defer.inlineCallbacks
    def test_a_staff_user_gets_every_event_in_the_wire_format(self) -> Any:
        client = self.get(self.boss)
        yield defer.Deferred.fromCoroutine(self.opened(client))
        self.assertIn("HTTP/1.1 200", client.head)
        for header in ("Content-Type: text/event-stream; charset=utf-8",
                       "Cache-Control: no-cache", "X-Accel-Buffering: no"):
            self.assertIn(header, client.head)
        self.hub.publish([LiveEvent(7, "call", {"call_id": "c", "state": "ringing"},
                                    ("999",)),
                          LiveEvent(8, "box", {"box": "office", "connected": False})])
        yield defer.Deferred.fromCoroutine(until(lambda: len(client.events()) == 2))
        self.assertEqual(client.events(), [
            ("7", "call", {"call_id": "c", "state": "ringing"}),
            ("8", "box", {"box": "office", "connected": False})])

    @defer.inlineCallbacks
    def test_a_user_who_is_not_staff_sees_the_calls_of_their_own_connection(self) -> Any:
        client = self.get(self.anna)
        yield defer.Deferred.fromCoroutine(self.opened(client))
        self.hub.publish([LiveEvent(1, "call", {"call_id": "other"}, ("2107654321", "101")),
                          LiveEvent(2, "call", {"call_id": "mine"}, ("2107654321", "100")),
                          LiveEvent(3, "ticket", {"call_id": "other"}, ("101",))])
        box = LiveEvent(4, "box", {"box": "office"})
        self.hub.publish([box])
        yield defer.Deferred.fromCoroutine(until(lambda: len(client.events()) == 2))
        self.assertEqual([(i, k) for i, k, _ in client.events()], [("2", "call"), ("4", "box")])

    @defer.inlineCallbacks
    def test_a_reconnect_gets_what_it_missed_then_the_live_events(self) -> Any:
        ids = [self.kept("call", {"call_id": f"c{n}"}, ["100" if n != 2 else "101"])
               for n in range(4)]
        client = self.get(self.anna, headers={"Last-Event-ID": str(ids[0])})
        polyfill = self.get(self.boss, path=f"/voip/events?last_event_id={ids[1]}")
        yield defer.Deferred.fromCoroutine(self.opened(client))
        yield defer.Deferred.fromCoroutine(self.opened(polyfill))
        self.hub.publish([LiveEvent(ids[3], "call", {"call_id": "c3"}, ("100",)),
                          LiveEvent(ids[3] + 1, "call", {"call_id": "c4"}, ("100",))])
        yield defer.Deferred.fromCoroutine(until(lambda: len(client.events()) == 3))
        self.assertEqual([int(i or 0) for i, _, _ in client.events()],
                         [ids[1], ids[3], ids[3] + 1])  # c2 is not hers; c3 not twice
        yield defer.Deferred.fromCoroutine(until(lambda: len(polyfill.events()) == 3))
        self.assertEqual([int(i or 0) for i, _, _ in polyfill.events()],
                         [ids[2], ids[3], ids[3] + 1])

    @defer.inlineCallbacks
    def test_an_id_older_than_the_window_is_told_to_reload(self) -> Any:
        ids = [self.kept("box", {"box": str(n)}) for n in range(3)]
        self.crm.query("DELETE FROM dpvoip.live_event WHERE id <= %s RETURNING id",
                       (ids[1],))
        client = self.get(self.boss, headers={"Last-Event-ID": str(ids[0])})
        yield defer.Deferred.fromCoroutine(until(lambda: len(client.events()) == 1))
        self.assertEqual(client.events(), [(None, "reload", {})])
        current = self.get(self.boss, headers={"Last-Event-ID": str(ids[2])})
        yield defer.Deferred.fromCoroutine(self.opened(current))
        self.assertEqual(current.events(), [])

    @defer.inlineCallbacks
    def test_heartbeats_keep_an_idle_stream_open(self) -> Any:
        client = self.get(self.boss)
        yield defer.Deferred.fromCoroutine(self.opened(client))
        self.clock.advance(15)
        yield defer.Deferred.fromCoroutine(until(lambda: b": keepalive\n\n" in client.body))
        self.clock.advance(15)
        yield defer.Deferred.fromCoroutine(
            until(lambda: client.body.count(b": keepalive") == 2))

    @defer.inlineCallbacks
    def test_beyond_the_maximum_503_and_a_place_frees_when_a_client_goes(self) -> Any:
        clients = [self.get(self.boss) for _ in range(3)]
        for client in clients:
            yield defer.Deferred.fromCoroutine(self.opened(client))
        refused = self.get(self.boss)
        yield defer.Deferred.fromCoroutine(until(lambda: b"\r\n\r\n" in refused.received))
        self.assertIn("HTTP/1.1 503", refused.head)
        self.assertIn("Retry-After: 30", refused.head)
        self.hang_up(clients[0])
        yield defer.Deferred.fromCoroutine(until(lambda: self.hub.open_streams == 2))
        again = self.get(self.boss)
        yield defer.Deferred.fromCoroutine(self.opened(again))

    @defer.inlineCallbacks
    def test_shutdown_ends_every_stream_cleanly(self) -> Any:
        clients = [self.get(self.boss), self.get(self.anna)]
        for client in clients:
            yield defer.Deferred.fromCoroutine(self.opened(client))
        self.hub.close_all()
        for client in clients:  # the chunked response's last chunk
            yield defer.Deferred.fromCoroutine(until(self.ended(client)))
            self.hang_up(client)

    @staticmethod
    def ended(client: RawClient) -> Callable[[], bool]:
        return lambda: client.received.endswith(b"0\r\n\r\n")

    @staticmethod
    def hang_up(client: RawClient) -> None:
        if client.transport is not None:
            client.transport.loseConnection()
