"""A provider written outside dpvoip, in the daemon: found through its entry point from
the configuration's ``[[provider]]`` table, its web resource served, its happenings
recorded as call rows by the same pipeline as the boxes', and click-to-call reaching its
dialler through a ``voip_connection`` that names it; a connection naming a provider the
daemon lacks is refused. The daemon runs in this process, on a real PostgreSQL."""

from __future__ import annotations

import json
from typing import Any, cast

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import load
from dpvoip.service import Daemon, build
from dpvoip.store.tokens import create_token
from test.support.crm import Crm
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.wiring import running
from test.test_providers import with_plugins

TOKEN = "echo-bearer-0123456789"


class EchoProviderTests(TestCase):
    timeout = 2 * PATIENCE

    def setUp(self) -> Any:
        with_plugins(self)
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        self.anna = self.crm.user("anna", first_name="Anna")
        self.echo_line = self.crm.insert(
            "voip_connection", type="sip", active=True, number="210 765 4321",
            callerid="Anna desk", provider="Echo", owner_id=self.anna)
        self.zadarma_line = self.crm.insert(
            "voip_connection", type="pbx", active=True, number="100",
            callerid="Anna cloud", provider="Zadarma", owner_id=self.anna)
        state = scratch(self)
        path = state / "dpvoip.toml"
        path.write_text(
            f'fritzbox = []\n[database]\nurl = "{self.dsn}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'[[provider]]\nkind = "echo"\nname = "echo"\ntoken = "{TOKEN}"\n',
            encoding="utf-8")
        config = load(path, {})
        self.assertEqual([(p.name, p.kind) for p in config.all_providers], [("echo", "echo")])
        self.daemon: Daemon = build(config, reactor, state)
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.port = await running(self, self.daemon)

    async def request(self, method: str, path: str, body: object = None,
                      bearer: str = TOKEN) -> tuple[int, Any]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Authorization": [f"Bearer {bearer}"], "Accept": ["application/json"],
            "Content-Type": ["application/json"]}
        response = await treq.request(
            method, f"http://127.0.0.1:{self.port}{path}", headers=headers, pool=self.http,
            data=json.dumps(body).encode() if body is not None else None)
        text = await response.content()
        try:
            return response.code, json.loads(text)
        except ValueError:
            return response.code, text

    async def _events_become_a_call_row(self) -> None:
        code, answer = await self.request("POST", "/voip/echo/",
                                          {"event": "start", "call": "7",
                                           "number": "6912345678"})
        self.assertEqual((code, answer), (200, {"call_id": "echo-echo-7"}))
        code, _ = await self.request("POST", "/voip/echo/",
                                     {"event": "end", "call": "7", "outcome": "missed"})
        self.assertEqual(code, 200)
        [row] = self.crm.query(
            "SELECT call_id, direction, phone_number, status FROM accounting_voipcall")
        self.assertEqual(row, ("echo-echo-7", "incoming", "+306912345678", "missed"))
        [(source, box)] = self.crm.query("SELECT source, box FROM dpvoip.call_detail")
        self.assertEqual((source, box), ("echo", "echo"))
        tickets = self.crm.query("SELECT count(*) FROM accounting_ticket")
        self.assertEqual(tickets, [(1,)], "a missed call is a ticket, as a box's is")
        self.assertEqual((await self.request("POST", "/voip/echo/", {}, bearer="wrong"))[0],
                         401)
        code, answer = await self.request("GET", "/voip/echo/")
        self.assertEqual((code, answer["provider"]), (200, "echo"))
        code, ready = await self.request("GET", "/readyz")
        self.assertEqual((code, ready["providers"]),
                         (200, [{"name": "echo", "kind": "echo", "requests": 4}]))
        self.assertIn("provider echo: 1 requests with a wrong token", ready["warnings"])
        _, metrics = await self.request("GET", "/metrics")
        self.assertIn(b'dpvoip_echo_requests_total{provider="echo"} 4.0', metrics)
        code, answer = await self.request("POST", "/voip/zd/", {})
        self.assertEqual((code, answer["error"]), (404, "Zadarma webhooks are not configured"))

    def test_its_web_resource_records_calls_through_the_pipeline(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._events_become_a_call_row())

    async def _click_to_call_reaches_its_dialler(self) -> None:
        _, token = await create_token(self.daemon.store, "public", "anna", "script")
        code, answer = await self.request(
            "POST", "/voip/get-callback/", {"connection": self.echo_line,
                                            "number": "210 123 4567"}, bearer=token)
        self.assertEqual(code, 200, answer)
        dialler = cast(Any, self.daemon.providers["echo"].dialler)
        [asked] = dialler.dialled
        self.assertEqual((asked.ring_first, asked.number, asked.user),
                         ("2107654321", "+302101234567", "anna"))
        code, answer = await self.request(
            "POST", "/voip/get-callback/", {"connection": self.zadarma_line,
                                            "number": "210 123 4567"}, bearer=token)
        self.assertEqual((code, answer["error"]), (
            400, f"your connection {self.zadarma_line} calls through the provider "
            "'Zadarma', which dpvoip is not configured for (it has: echo); ask your "
            "administrator"))
        code, answer = await self.request(
            "POST", "/voip/get-callback/", {"connection": self.echo_line,
                                            "number": "210 123 4560"}, bearer=token)
        self.assertEqual((code, answer["error"]), (409, "echo refuses numbers ending in 0"))
        self.assertEqual(len(dialler.dialled), 1)
        recorded = self.crm.query(
            "SELECT connection_id, result, http_status FROM dpvoip.callback_request"
            " ORDER BY id")
        self.assertEqual(recorded, [(self.echo_line, "dialled", 200),
                                    (self.zadarma_line, "refused", 400),
                                    (self.echo_line, "refused", 409)])

    def test_click_to_call_reaches_its_dialler(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._click_to_call_reaches_its_dialler())
