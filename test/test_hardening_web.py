"""Issue 14 point 7 (and point 1 on click-to-call's paths): secrets and headers at the web
edge.

* a database URL libpq cannot read is reported without its password (``dpvoip check``,
  the configuration error, the daemon's own ``ConfigError``);
* ``X-Forwarded-Host`` counts for the origin check only from a trusted proxy;
* every answer carries ``X-Content-Type-Options: nosniff`` and no ``Server`` header, the
  rejections the server writes itself included; ``POST /voip/zd`` is the webhook too;
* the text log escapes what a caller id, a user agent or a path can carry; JSON lines
  stay valid JSON;
* a recording link only for staff and the users whose connection was a leg of the call
  (``[click_to_call] recordings = "any-user"`` lifts it); ``/voip/calls/%00/recording``
  and a control character in a query parameter are 400s naming the parameter.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dpvoip import cli
from dpvoip.click_to_call.callbacks import ANY_USER, STAFF_OR_OWN, ClickToCall
from dpvoip.click_to_call.logins import CrmUser
from dpvoip.config import ConfigError, DatabaseSettings
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.numbers import Dialling
from dpvoip.logs import observer
from dpvoip.store.dsn import connection_dsn, problem
from dpvoip.testing.memory import MemoryCallbacks, MemoryZadarmaApi
from dpvoip.web.callback import CallbackPages
from dpvoip.web.sources import networks
from dpvoip.zadarma.signing import webhook_signature
from test.test_routes_memory import ORIGIN, RoutesCase
from test.test_zadarma_webhook import PBX, SECRET, START, WebhookTestCase

PASSWORD = "Sup3rSecretPw"
MALFORMED = [
    f"postgresql://bob:{PASSWORD}@db.example/crm?sslmode=require&x",
    f"postgres://bob:{PASSWORD}@[::1/crm",
    f"postgresql://bob:{PASSWORD}@db.example/crm?bogus=1",
    f"postgresql://bob@db/crm?password={PASSWORD}&x",
    f"host=db password={PASSWORD} port",
    f"host=db password='{PASSWORD} x' port",
    f"host=db password={PASSWORD} dbname='unterminated",
]


class DatabaseUrlTests(SynchronousTestCase):
    def test_libpqs_complaint_never_carries_the_password(self) -> None:
        for url in MALFORMED:
            found = problem(url)
            self.assertIsNotNone(found, url)
            self.assertNotIn(PASSWORD, found or "", url)
            error = self.assertRaises(ConfigError, connection_dsn, url, DatabaseSettings())
            self.assertNotIn(PASSWORD, str(error))
            self.assertIsNone(error.__cause__)
        self.assertIsNone(problem(f"postgresql://bob:{PASSWORD}@db.example:5432/crm"))

    def test_dpvoip_check_says_what_is_wrong_without_the_password(self) -> None:
        for url in MALFORMED:
            out, err = io.StringIO(), io.StringIO()
            self.patch(sys, "stdout", out)
            self.patch(sys, "stderr", err)
            self.patch(os, "environ", {"DATABASE_URL": url})
            exited = self.assertRaises(SystemExit, cli.main, ["check"])
            self.assertEqual(exited.code, 2)
            self.assertIn("[database] url (DATABASE_URL) cannot be read", err.getvalue())
            self.assertNotIn(PASSWORD, out.getvalue() + err.getvalue(), url)


class ForwardedHostTests(SynchronousTestCase):
    """A cookie POST with no Sec-Fetch-Site and no configured origins: the Origin must be
    the host the browser addressed. ``X-Forwarded-Host`` says so only from a proxy."""

    def request(self, peer: str) -> Any:
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 40000)
        request.requestHeaders.setRawHeaders(b"Origin", [b"https://crm.example.com"])
        request.requestHeaders.setRawHeaders(b"Host", [b"127.0.0.1:8080"])
        request.requestHeaders.setRawHeaders(b"X-Forwarded-Host", [b"crm.example.com"])
        return request

    def test_forwarded_host_is_believed_only_from_a_trusted_proxy(self) -> None:
        pages = CallbackPages(None, None, (), "/login/", Clock(),  # type: ignore[arg-type]
                              proxies=networks(["10.0.0.1/32"]))
        self.assertTrue(pages._same_origin(self.request("10.0.0.1")))
        self.assertFalse(pages._same_origin(self.request("203.0.113.9")))


class HeadersAndSlashTests(WebhookTestCase):
    """The daemon as wired: headers of every kind of answer; the webhook without slash."""

    def start_form(self, pbx: str) -> dict[str, str]:
        return {"event": "NOTIFY_START", "pbx_call_id": pbx, "call_start": START,
                "caller_id": "6912345678", "called_did": "302107654321"}

    @defer.inlineCallbacks
    def test_nosniff_and_no_server_header_on_every_answer(self) -> Any:
        base = self.url.removesuffix("/voip/zd/")
        answers = []
        for path in ("/healthz", "/readyz", "/metrics", "/nowhere", "/voip/get-callback/",
                     "/voip/zd/?zd_echo=x"):
            answers.append((yield treq.get(base + path, pool=self.http)))
        answers.append((yield treq.post(self.url, data=b"a=1", pool=self.http)))  # 415
        for response in answers:
            yield response.content()
            self.assertEqual(response.headers.getRawHeaders(b"X-Content-Type-Options"),
                             [b"nosniff"], response.code)
            self.assertIsNone(response.headers.getRawHeaders(b"Server"), response.code)
        # a request the server refuses before any route: written raw, the same headers
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        raw = yield connectProtocol(TCP4ClientEndpoint(self._reactor(), "127.0.0.1", port),
                                    _Collect(b"GARBAGE\r\n\r\n"))
        text = yield raw.done
        self.assertIn(b" 400 ", text.split(b"\r\n", 1)[0])
        self.assertIn(b"X-Content-Type-Options: nosniff", text)
        self.assertNotIn(b"Server:", text)

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor

    @defer.inlineCallbacks
    def test_post_without_the_slash_is_the_webhook_signature_and_all(self) -> Any:
        no_slash = self.url.removesuffix("/")
        form = self.start_form(PBX)
        for signature, expected in (("forged", 401), (webhook_signature(SECRET, form), 200)):
            headers: dict[bytes | str, list[bytes | str]] = {
                "Content-Type": ["application/x-www-form-urlencoded"],
                "Signature": [signature or ""], "X-Forwarded-For": ["185.45.152.41"]}
            response = yield treq.post(no_slash, data=urlencode(form).encode(),
                                       pool=self.http, headers=headers)
            body = yield response.content()
            self.assertEqual(response.code, expected, body)
        journal = self.crm.query("SELECT pbx_call_id, event FROM dpvoip.zadarma_event")
        self.assertEqual(journal, [(PBX, "NOTIFY_START")])


class _Collect(Protocol):
    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.received)


class LogEscapingTests(SynchronousTestCase):
    CALLER = "6912345678\n2026-01-15T10:00:00+0200 [dpvoip#info] forged\x1b[2J\x9b31m\r\u2028"

    def emit(self, format: str) -> str:
        stream = io.StringIO()
        watch = observer(format, "info", stream)
        log = Logger(namespace="dpvoip.zadarma", observer=watch)
        log.info("call from {caller} (agent {agent})", caller=self.CALLER,
                 agent="curl\x00\x07")
        log.warn("path {path!r} refused", path="/voip/\n\x1b]0;title\x07")
        try:
            raise ValueError("bad\nvalue\x1b[0m")
        except ValueError:
            log.failure("failed for {caller}", Failure(), caller=self.CALLER,
                        level=LogLevel.error)
        return stream.getvalue()

    def test_text_log_values_cannot_forge_lines_or_drive_the_terminal(self) -> None:
        text = self.emit("text")
        lines = text.splitlines()
        starts = [line for line in lines if not line.startswith("\t")]
        self.assertEqual(len(starts), 3, text)  # one line per event; the traceback indented
        self.assertTrue(all(line.split(" ", 1)[0][:4].isdigit() for line in starts))
        self.assertIn("6912345678\\n2026-01-15T10:00:00+0200 [dpvoip#info] forged\\x1b[2J"
                      "\\x9b31m\\r\\u2028", starts[0])
        self.assertIn("curl\\x00\\x07", starts[0])
        for char in "\x00\x07\x1b\x9b\r\u2028":
            self.assertNotIn(char, text)
        self.assertIn("\tbuiltins.ValueError: bad", text)

    def test_json_log_stays_valid_json_without_raw_controls(self) -> None:
        text = self.emit("json")
        records = [json.loads(line) for line in text.splitlines()]
        self.assertEqual(len(records), 3)
        self.assertEqual(records[0]["caller"], self.CALLER)
        for char in "\x00\x07\x1b\x9b\r\u2028":
            self.assertNotIn(char, text)


class RecordingRightsTests(SynchronousTestCase):
    """Who gets a link (``ClickToCall.recording_link``), over the in-memory store."""

    def setUp(self) -> None:
        self.store = MemoryCallbacks()
        self.api = MemoryZadarmaApi(Clock())
        self.api.add_recording("rec-1")
        self.store.add_connection(1, "100")  # anna's desk took the call
        self.store.add_connection(2, "200")  # bob's did not
        self.store.staff.add(3)
        self.store.add_call("zd-in_1", "rec-1", crm_call_id=41, legs=("100", "302107654321"))
        self.users = {name: CrmUser(uid, name, name, "jwt")
                      for uid, name in ((1, "anna"), (2, "bob"), (3, "boss"))}

    def links(self, recordings: str) -> dict[str, str]:
        calls = ClickToCall(self.store, self.api, DiallingPolicy(frozenset({"GR"}), (), False),
                            Dialling("GR"), 5, Clock(),
                            recordings=recordings)
        seen = {}
        for name, user in self.users.items():
            for call in ("41", "zd-in_1"):
                done = defer.Deferred.fromCoroutine(calls.recording_link(user, call))
                result: list[Any] = []
                done.addBoth(result.append)
                outcome = result[0]
                seen[f"{name} {call}"] = ("link" if isinstance(outcome, str)
                                          else type(outcome.value).__name__)
        return seen

    def test_staff_or_own_is_the_default_and_any_user_lifts_it(self) -> None:
        self.assertEqual(self.links(STAFF_OR_OWN), {
            "anna 41": "link", "anna zd-in_1": "link", "bob 41": "NoRecording",
            "bob zd-in_1": "NoRecording", "boss 41": "link", "boss zd-in_1": "link"})
        self.assertEqual(set(self.links(ANY_USER).values()), {"link"})
        from dpvoip.config import ClickToCallSettings

        self.assertEqual(ClickToCallSettings().recordings, STAFF_OR_OWN)


class RecordingPathTests(RoutesCase):
    def setUp(self) -> None:
        super().setUp()
        self.callbacks.add_call("zd-in_1", "1700000000.123", crm_call_id=41, legs=("100",))
        self.bob = self.accounts.add_user("bob", password="pw-bob", first_name="Bob",
                                          last_name="B")

    def recording(self, call: str, bearer: str) -> tuple[int, str]:
        answer = self.get(url=f"{ORIGIN}/voip/calls/{call}/recording", bearer=bearer)
        return answer.code, answer.body

    def test_a_call_id_no_call_can_have_is_a_400_naming_it(self) -> None:
        token = self.jwt()
        for call in ("%00", "zd-in%00_1", "%C2%B2", "%E2%91%A0", "a%0Ab", "x" * 65):
            code, body = self.recording(call, token)
            self.assertEqual(code, 400, call)
            self.assertIn("is not a call id", json.loads(body)["error"])
        self.assertEqual(self.api.recordings_asked, [])

    def test_a_control_character_in_a_query_parameter_is_a_400_naming_it(self) -> None:
        for query in ("number=69%00123", "number%00=1", "number=1&x=%1B"):
            answer = self.get(query=query, bearer=self.jwt(), accept="application/json")
            self.assertEqual(answer.code, 400, query)
            self.assertIn("control character", answer.json()["error"])

    def test_another_users_call_is_answered_as_one_without_recording(self) -> None:
        self.api.add_recording("1700000000.123")
        self.assertEqual(self.recording("41", self.jwt(self.bob))[0], 404)
        self.assertEqual(self.recording("41", self.jwt())[0], 302)
        self.assertEqual(self.api.recordings_asked, ["1700000000.123"])

