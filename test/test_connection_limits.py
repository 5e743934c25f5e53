"""Issue 14 point 8: idle sockets cannot block the webhooks.

The daemon as wired, its web limits lowered to 20 per peer and 50 in all. Idle sockets
from three loopback addresses (127.0.0.2-4) fill them: the ones beyond a limit are closed
at once and counted in /metrics; a fourth address is refused by the total; the webhook
from Zadarma's address (127.0.0.1, allowlisted: exempt from the total) is still answered.
A trusted proxy is exempt from both limits. Bounded in sockets (about a hundred, loopback
only), not in time: the trial timeout is a hang detector.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import Secret, WebSettings, ZadarmaSettings
from dpvoip.service import Daemon, build
from dpvoip.web.server import ConnectionLimits
from dpvoip.web.sources import networks
from dpvoip.zadarma.signing import webhook_signature
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.wiring import in_process, running
from test.test_database import eventually

SECRET = "limit-secret"
PER_PEER, TOTAL = 20, 50


class _Idle(Protocol):
    """A client that connects and says nothing; notes when the server closes it."""

    def __init__(self, closed: list[_Idle]) -> None:
        self.closed = closed

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.append(self)


class IdleSocketsTests(TestCase):
    timeout = 4 * PATIENCE  # a hang detector

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2026-08")
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        web = replace(WebSettings(), listen="tcp:0:interface=127.0.0.1", trusted_proxies=(),
                      max_connections=TOTAL, max_connections_per_peer=PER_PEER)
        config = replace(in_process(
            self.dsn, zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET),
                                      timezone="Europe/Athens",
                                      allowed_networks=("127.0.0.1/32",))), web=web)
        self.daemon: Daemon = build(config, reactor, scratch(self))
        self.clients: list[_Idle] = []
        self.closed: list[_Idle] = []
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.port = await running(self, self.daemon)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._close_all()))

    async def _close_all(self) -> None:
        for client in self.clients:
            if client not in self.closed and client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]
        await eventually(lambda: self.daemon.web.site.limits.open == 0, PATIENCE)

    async def open_idle(self, source: str, count: int) -> None:
        for _ in range(count):
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port,
                                          bindAddress=(source, 0))
            client = await connectProtocol(endpoint, _Idle(self.closed))
            self.clients.append(client)

    async def webhook(self) -> int:
        form = {"event": "NOTIFY_START", "pbx_call_id": "in_" + "c" * 40,
                "call_start": "2026-01-15 10:00:00", "caller_id": "6912345678",
                "called_did": "302107654321"}
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": ["application/x-www-form-urlencoded"],
            "Signature": [webhook_signature(SECRET, form) or ""]}
        response = await treq.post(f"http://127.0.0.1:{self.port}/voip/zd/",
                                   data=urlencode(form).encode(), pool=self.http,
                                   headers=headers)
        await response.content()
        return int(response.code)

    async def metrics(self) -> str:
        response = await treq.get(f"http://127.0.0.1:{self.port}/metrics", pool=self.http)
        return (await response.content()).decode()

    @defer.inlineCallbacks
    def test_idle_sockets_beyond_the_limits_are_closed_and_webhooks_still_answered(
            self) -> Any:
        limits = self.daemon.web.site.limits
        expected_closed = 0
        for source, count, kept in (("127.0.0.2", 25, 20), ("127.0.0.3", 25, 20),
                                    ("127.0.0.4", 25, 10), ("127.0.0.5", 3, 0)):
            yield defer.Deferred.fromCoroutine(self.open_idle(source, count))
            expected_closed += count - kept
            wanted = expected_closed
            yield defer.Deferred.fromCoroutine(eventually(
                lambda wanted=wanted: len(self.closed) == wanted, PATIENCE))
        sent, held = len(self.clients), len(self.clients) - len(self.closed)
        print(f"\nidle sockets: opened {sent}, held {held}, closed at once "
              f"{len(self.closed)} (per peer {limits.refused['per_peer']}, total "
              f"{limits.refused['total']}); limits {PER_PEER} per peer, {TOTAL} in all")
        self.assertEqual(held, TOTAL)
        self.assertEqual(limits.refused, {"per_peer": 10, "total": 18})
        code = yield defer.Deferred.fromCoroutine(self.webhook())
        self.assertEqual(code, 200)
        text = yield defer.Deferred.fromCoroutine(self.metrics())
        self.assertIn('dpvoip_web_connections_refused_total{limit="per_peer"} 10', text)
        self.assertIn('dpvoip_web_connections_refused_total{limit="total"} 18', text)
        # the closed ones were closed by the server, not by a timeout: nothing else waited
        self.assertEqual(self.daemon.web.site.limits.counted, TOTAL)


class LimitRulesTests(SynchronousTestCase):
    def test_proxies_are_exempt_and_reserved_peers_escape_only_the_total(self) -> None:
        limits = ConnectionLimits(3, 2, proxies=networks(["10.0.0.1/32"]),
                                  reserved=networks(["185.45.152.0/24"]))
        for _ in range(10):
            self.assertIsNone(limits.admit("10.0.0.1"))
            limits.opened("10.0.0.1")
        for peer in ("203.0.113.1", "203.0.113.1", "203.0.113.2"):
            self.assertIsNone(limits.admit(peer))
            limits.opened(peer)
        self.assertEqual(limits.admit("203.0.113.1"), "per_peer")
        self.assertEqual(limits.admit("203.0.113.3"), "total")
        self.assertIsNone(limits.admit("185.45.152.41"))
        limits.opened("185.45.152.41")
        self.assertIsNone(limits.admit("185.45.152.41"))
        limits.opened("185.45.152.41")
        self.assertEqual(limits.admit("185.45.152.41"), "per_peer")
        limits.closed("203.0.113.2")
        self.assertIsNone(limits.admit("203.0.113.3"))
        self.assertEqual((limits.open, limits.counted), (14, 2))
        self.assertEqual(limits.refused, {"per_peer": 2, "total": 1})
