"""The HTTP surface as clients and administrators meet it: JSON answers and errors, body
and header limits, slow and idle clients, a secret-free access log, draining at shutdown.

Live tests listen on 127.0.0.1 port 0 with the real reactor; the others drive a channel
over a StringTransport with a Clock, so timeouts are exact and instant.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import provider

from dpvoip.calls.ingest import ZadarmaContext, ZadarmaOutcome
from dpvoip.config import Secret, WebSettings
from dpvoip.core.numbers import Dialling
from dpvoip.logs import json_line
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.errors import (
    INTERNAL_ERROR,
    HttpError,
    error_answer,
    error_body,
    failure_answer,
    raw_response,
)
from dpvoip.web.server import DpvoipSite, WebService
from dpvoip.web.sources import networks
from dpvoip.web.zadarma import ZadarmaWebhook
from dpvoip.zadarma.events import ZadarmaEvent
from dpvoip.zadarma.signing import webhook_signature
from test.support.ports import HeldPort, HeldPortReactor
from test.support.waiting import until

VERSION = "9.8.7-test"
JSON = "application/json"


def settings(**changes: Any) -> WebSettings:
    return replace(WebSettings(), listen="tcp:0:interface=127.0.0.1", **changes)


class Probe:
    """The injected readiness probe: ready or not, failing, or held until the test says."""

    def __init__(self) -> None:
        self.ready = True
        self.calls = 0
        self.error: Exception | None = None
        self.held: Deferred[Readiness] | None = None

    def __call__(self) -> Deferred[Readiness]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.held is not None:
            return self.held
        return succeed(Readiness(self.ready, {"database": {"reachable": self.ready}}))


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the first response in ``raw``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                return status, headers, body
            body, rest = body + rest[:size], rest[size + 2 :]
    return status, headers, rest[: int(headers.get("content-length", len(rest)))]


def capture_log(case: SynchronousTestCase) -> list[LogEvent]:
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def access_lines(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_namespace") == "dpvoip.web.access" and "status" in e]


class Wire:
    """One client connection to a DpvoipSite, over a StringTransport, timed by a Clock."""

    def __init__(self, web: WebSettings, probe: Probe, clock: Clock | None = None,
                 zadarma: ZadarmaWebhook | None = None, peer: str = "127.0.0.1") -> None:
        self.clock = clock or Clock()
        app = WebApp(probe, VERSION, zadarma=zadarma)
        self.site = DpvoipSite(app.resource(), web, self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.channel: Any = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        return parse(self.transport.value())

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def get(path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class LiveTests(TestCase):
    """A real client against a site listening on loopback."""

    def setUp(self) -> None:
        self.probe = Probe()
        self.site = DpvoipSite(WebApp(self.probe, VERSION).resource(), settings(), reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    def listen(self) -> str:
        site: Any = self.site
        port: Any = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def call(self, method: str, url: str) -> tuple[int, str, bytes, Any]:
        response = await treq.request(method, url, pool=self.pool)
        body = await response.content()
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, kind, body, response.headers

    async def test_healthz_answers_get_and_head(self) -> None:
        url = self.listen()
        code, kind, body, _ = await self.call("GET", url + "/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"alive": True, "version": VERSION}))
        self.assertTrue(kind.startswith(JSON))
        code, _, body, _ = await self.call("HEAD", url + "/healthz")
        self.assertEqual((code, body), (200, b""))

    async def test_readyz_follows_the_probe(self) -> None:
        url = self.listen()
        code, kind, body, _ = await self.call("GET", url + "/readyz")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {"ready": True, "database": {"reachable": True}})
        self.assertTrue(kind.startswith(JSON))
        self.probe.ready = False
        code, kind, body, _ = await self.call("GET", url + "/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body), {"ready": False, "database": {"reachable": False}})
        self.assertTrue(kind.startswith(JSON))

    async def test_errors_are_json_without_tracebacks(self) -> None:
        url = self.listen()
        code, kind, body, _ = await self.call("GET", url + "/no/such/thing")
        self.assertEqual((code, json.loads(body)["status"]), (404, 404))
        self.assertIn("error", json.loads(body))
        self.assertTrue(kind.startswith(JSON))

        code, kind, body, headers = await self.call("POST", url + "/healthz")
        self.assertEqual((code, json.loads(body)["status"]), (405, 405))
        self.assertEqual(headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertTrue(kind.startswith(JSON))

        self.probe.error = RuntimeError("probe exploded, password=hunter2")
        code, kind, body, _ = await self.call("GET", url + "/readyz")
        self.assertEqual(code, 500)
        self.assertEqual(set(json.loads(body)), {"error", "status"})
        self.assertTrue(kind.startswith(JSON))
        for leak in (b"Traceback", b"hunter2", b"RuntimeError", b'File "'):
            self.assertNotIn(leak, body)
        # The details go to the log instead, for the administrator.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_stop_refuses_new_connections_and_waits_for_requests_in_flight(self) -> None:
        held = self.probe.held = Deferred()

        def release() -> None:  # so that a failing test still leaves a clean reactor
            if not held.called:
                held.callback(Readiness(True, {}))

        self.addCleanup(release)
        # The port stays ours after the service stops listening (a HeldPort), so that the
        # refusal below is the service's and not whatever else took the number meanwhile.
        kept = HeldPort()
        self.addCleanup(kept.close)
        service = WebService(HeldPortReactor(reactor, kept), self.site,
                             "tcp:0:interface=127.0.0.1")
        port: Any = await service.listen()
        number = port.getHost().port
        self.assertEqual(number, kept.port)
        answer = Deferred.fromCoroutine(self.call("GET", f"http://127.0.0.1:{number}/readyz"))
        await until(lambda: self.site.in_flight == 1)

        stopping = service.stopService()
        self.assertIsNone(service.port)
        await until(lambda: not port.connected)
        # refused at once: the connect timeout is there for a hang only
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number, timeout=60)
        await self.assertFailure(
            endpoint.connect(Factory.forProtocol(Protocol)), ConnectionRefusedError
        )
        await deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(stopping.called, "stopped while a request was in flight")

        held.callback(Readiness(True, {}))
        code, _, body, _ = await answer
        self.assertEqual((code, json.loads(body)), (200, {"ready": True}))
        await stopping
        self.assertEqual(self.site.in_flight, 0)


class DrainTimeoutTests(SynchronousTestCase):
    def test_stop_gives_up_on_a_stuck_request_after_drain_timeout(self) -> None:
        clock = MemoryReactorClock()
        probe = Probe()
        probe.held = Deferred()
        wire = Wire(settings(drain_timeout=3.0), probe, clock)
        service = WebService(clock, wire.site, "tcp:0:interface=127.0.0.1")
        self.successResultOf(service.listen())
        wire.send(get("/readyz"))
        self.assertEqual(wire.site.in_flight, 1)

        stopping = service.stopService()
        self.assertIsNone(service.port)
        clock.advance(2.9)
        self.assertNoResult(stopping)
        clock.advance(0.2)
        self.successResultOf(stopping)
        self.assertEqual(wire.site.in_flight, 1)  # left to finish (or fail) on its own
        probe.held.callback(Readiness(True, {}))
        self.assertEqual(wire.response()[0], 200)
        self.assertEqual(wire.site.in_flight, 0)


class BodyLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.probe = Probe()
        self.wire = Wire(settings(max_body_bytes=1024), self.probe)

    def assertRefused(self) -> None:
        status, headers, body = self.wire.response()
        self.assertEqual(status, 413)
        self.assertTrue(headers["content-type"].startswith(JSON))
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(json.loads(body)["status"], 413)
        self.assertTrue(self.wire.transport.disconnecting)
        self.assertEqual(self.probe.calls, 0, "the route ran for a refused request")
        self.assertEqual(self.wire.site.in_flight, 0)

    def test_announced_length_over_limit_is_refused_before_the_body(self) -> None:
        self.wire.send(get("/readyz", "Content-Length: 1025"))
        self.assertRefused()
        written = self.wire.transport.value()
        self.wire.send(b"x" * 1025)
        self.assertEqual(self.wire.transport.value(), written)  # one answer, nothing more
        self.assertEqual(self.probe.calls, 0)

    def test_chunked_body_growing_over_limit_is_refused(self) -> None:
        self.wire.send(get("/readyz", "Transfer-Encoding: chunked"))
        for _ in range(4):
            self.wire.send(b"100\r\n" + b"a" * 256 + b"\r\n")
        self.assertEqual(self.wire.transport.value(), b"")  # 1024 bytes: still fine
        self.wire.send(b"1\r\nb\r\n")
        self.assertRefused()
        self.wire.send(b"0\r\n\r\n")
        self.assertEqual(self.probe.calls, 0)

    def test_bodies_within_the_limit_reach_the_route(self) -> None:
        self.wire.send(get("/readyz", "Content-Length: 1024", body=b"x" * 1024))
        self.assertEqual(self.wire.response()[0], 200)
        self.wire.transport.clear()
        self.wire.send(get("/readyz", "Transfer-Encoding: chunked"))
        self.wire.send(b"3e8\r\n" + b"y" * 1000 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.wire.response()[0], 200)
        self.assertEqual(self.probe.calls, 2)

    def test_expect_continue_gets_only_the_413(self) -> None:
        self.wire.send(get("/readyz", "Content-Length: 2000000", "Expect: 100-continue"))
        self.assertRefused()
        self.assertNotIn(b"100 Continue", self.wire.transport.value())


class SlowAndIdleClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.probe = Probe()
        self.wire = Wire(settings(request_timeout=5.0, idle_timeout=30.0), self.probe)

    def assertCutOff(self) -> None:
        status, headers, body = self.wire.response()
        self.assertEqual((status, json.loads(body)["status"]), (408, 408))
        self.assertTrue(headers["content-type"].startswith(JSON))
        self.assertTrue(self.wire.transport.disconnected, "connection not aborted")
        self.wire.lose()
        self.assertEqual(self.wire.site.in_flight, 0)

    def test_partial_headers_cut_off_after_request_timeout(self) -> None:
        self.wire.send(b"GET /healthz HTTP/1.1\r\nHost: loc")
        self.wire.clock.advance(4.9)
        self.assertEqual(self.wire.transport.value(), b"")
        self.assertFalse(self.wire.transport.disconnecting)
        self.wire.clock.advance(0.2)
        self.assertCutOff()

    def test_partial_body_cut_off_after_request_timeout(self) -> None:
        self.wire.send(get("/readyz", "Content-Length: 10", body=b"abc"))
        self.wire.clock.advance(5.1)
        self.assertCutOff()
        self.assertEqual(self.probe.calls, 0)

    def test_trickling_bytes_do_not_extend_the_deadline(self) -> None:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n":
            if self.wire.transport.value():
                break
            self.wire.send(bytes([byte]))
            self.wire.clock.advance(1.0)
        self.assertEqual(self.wire.clock.seconds(), 5.0)
        self.assertCutOff()

    def test_idle_keep_alive_connection_closed_after_idle_timeout(self) -> None:
        self.wire.send(get("/healthz"))
        self.assertEqual(self.wire.response()[0], 200)
        self.wire.transport.clear()
        self.wire.clock.advance(29.9)  # well past request_timeout: no 408 between requests
        self.assertEqual(self.wire.transport.value(), b"")
        self.assertFalse(self.wire.transport.disconnecting)
        self.wire.clock.advance(0.2)
        self.assertTrue(self.wire.transport.disconnecting)
        self.assertEqual(self.wire.transport.value(), b"")

    def test_pipelined_partial_request_is_also_cut_off(self) -> None:
        self.wire.send(get("/healthz") + b"GET /healthz HTTP/1.1\r\nHo")
        self.assertEqual(self.wire.response()[0], 200)
        self.wire.transport.clear()
        self.wire.clock.advance(5.1)
        self.assertCutOff()


class HeaderLimitTests(SynchronousTestCase):
    def test_more_header_lines_than_max_headers_is_a_400(self) -> None:
        probe = Probe()
        extra = [f"X-Extra-{i}: v" for i in range(9)]  # with Host: exactly 10 lines
        accepted = Wire(settings(max_headers=10), probe)
        accepted.send(get("/readyz", *extra))
        self.assertEqual(accepted.response()[0], 200)

        refused = Wire(settings(max_headers=10), probe)
        refused.send(get("/readyz", *extra, "X-One-Too-Many: v"))
        status, headers, body = refused.response()
        self.assertEqual((status, json.loads(body)["status"]), (400, 400))
        self.assertTrue(headers["content-type"].startswith(JSON))
        self.assertTrue(refused.transport.disconnecting)
        self.assertEqual(probe.calls, 1)  # only the accepted request reached the route


class AccessLogTests(SynchronousTestCase):
    def assertNoSecret(self, events: list[LogEvent]) -> None:
        self.assertTrue(events)
        for event in events:
            self.assertNotIn("SECRET123", formatEvent(event))
            self.assertNotIn("SECRET123", json_line(event))

    def test_one_line_per_request_with_the_path_and_no_query(self) -> None:
        events = capture_log(self)
        wire = Wire(settings(), Probe())
        wire.send(get("/healthz?token=SECRET123"))
        self.assertEqual(wire.response()[0], 200)
        [line] = access_lines(events)
        self.assertEqual((line["method"], line["path"], line["status"]), ("GET", "/healthz", 200))
        self.assertIn("GET /healthz 200", formatEvent(line))
        self.assertNoSecret(events)

    def test_refused_request_logged_without_query(self) -> None:
        events = capture_log(self)
        wire = Wire(settings(max_body_bytes=1024), Probe())
        wire.send(get("/readyz?token=SECRET123", "Content-Length: 5000"))
        self.assertEqual(wire.response()[0], 413)
        wire.lose()
        [line] = access_lines(events)
        self.assertEqual((line["path"], line["status"]), ("/readyz", 413))
        self.assertNoSecret(events)

    def test_access_log_can_be_switched_off(self) -> None:
        events = capture_log(self)
        wire = Wire(settings(access_log=False), Probe())
        wire.send(get("/healthz"))
        self.assertEqual(wire.response()[0], 200)
        self.assertEqual(access_lines(events), [])


# -- POST /voip/zd/: one route, in front of Klein; the answers around it as before ------------

SECRET = "zd-web-secret"
ZADARMA_PEER = "185.45.152.41"
EVENT = {"event": "NOTIFY_START", "pbx_call_id": "in_" + "a" * 40,
         "call_start": "2026-01-15 10:00:00", "caller_id": "6912345678",
         "called_did": "302107654321"}


class Recorder:
    """Stands for the durable ingest: records what it is given, or fails as told."""

    def __init__(self) -> None:
        self.events: list[tuple[ZadarmaEvent, ZadarmaContext]] = []
        self.error: Exception | None = None

    def submit_zadarma(self, event: ZadarmaEvent, form: dict[str, str],
                       context: ZadarmaContext) -> Deferred[ZadarmaOutcome]:
        if self.error is not None:
            raise self.error
        self.events.append((event, context))
        return succeed(ZadarmaOutcome(duplicate=False))


def webhook(recorder: Recorder) -> ZadarmaWebhook:
    return ZadarmaWebhook(recorder=recorder,
                          context=ZadarmaContext(Dialling("GR"), ZoneInfo("Europe/Athens")),
                          secret=Secret(SECRET), allowlist=networks(["185.45.152.0/24"]),
                          proxies=())


def request(method: str, path: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}",
             *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def signed_event(form: dict[str, str] = EVENT) -> bytes:
    return request("POST", "/voip/zd/", urlencode(form).encode(),
                   "Content-Type: application/x-www-form-urlencoded",
                   f"Signature: {webhook_signature(SECRET, form)}")


class WebhookRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.recorder = Recorder()
        self.hook = webhook(self.recorder)

    def wire(self, configured: bool = True) -> Wire:
        return Wire(settings(), Probe(), zadarma=self.hook if configured else None,
                    peer=ZADARMA_PEER)

    def test_klein_has_no_post_route_for_the_webhook(self) -> None:
        methods = [rule.methods for rule in WebApp.app.url_map.iter_rules()
                   if rule.rule == "/voip/zd/"]
        self.assertEqual(methods, [{"GET", "HEAD"}])

    def test_a_signed_event_is_recorded_and_answered_by_the_front_route(self) -> None:
        wire = self.wire()
        wire.send(signed_event())
        status, headers, body = wire.response()
        self.assertEqual((status, json.loads(body)), (200, {}))
        self.assertEqual(headers["content-length"], str(len(body)))  # written whole, not
        self.assertNotIn("transfer-encoding", headers)                # streamed by Klein
        [(event, _)] = self.recorder.events
        self.assertEqual(event.kind, "NOTIFY_START")

    def test_other_methods_on_the_webhook_path_are_405_allowing_post(self) -> None:
        for configured in (True, False):
            for method, path in (("PUT", "/voip/zd/"), ("DELETE", "/voip/zd/?zd_echo=1"),
                                 ("OPTIONS", "/voip/zd/"), ("PATCH", "/voip/zd//"),
                                 ("PUT", "/voip/%7Ad/")):
                wire = self.wire(configured)
                wire.send(request(method, path))
                status, headers, body = wire.response()
                self.assertEqual((status, headers["allow"]), (405, "GET, HEAD, POST"),
                                 (method, path))
                self.assertEqual(json.loads(body), {
                    "error": f"method {method} not allowed here", "status": 405})
        self.assertEqual(self.recorder.events, [])

    def test_other_paths_keep_their_answers(self) -> None:
        for method, path, status in (("POST", "/voip/zd/x", 404), ("PUT", "/voip/zd", 404),
                                     ("POST", "/VOIP/zd/", 404), ("POST", "/healthz", 405)):
            wire = self.wire()
            wire.send(request(method, path))
            self.assertEqual(wire.response()[0], status, (method, path))
        wire = self.wire()
        wire.send(request("POST", "/healthz"))
        self.assertEqual(wire.response()[1]["allow"], "GET, HEAD")
        self.assertEqual(self.recorder.events, [])

    def test_without_a_webhook_the_path_is_404_for_events_and_echo(self) -> None:
        for sent in (signed_event(), request("GET", "/voip/zd/?zd_echo=abc")):
            wire = self.wire(configured=False)
            wire.send(sent)
            status, headers, body = wire.response()
            self.assertEqual((status, json.loads(body)), (
                404, {"error": "Zadarma webhooks are not configured", "status": 404}))
            self.assertTrue(headers["content-type"].startswith(JSON))

    def test_the_echo_still_comes_first(self) -> None:
        wire = self.wire()
        wire.send(request("GET", "/voip/zd/?zd_echo=a1b2"))
        self.assertEqual(wire.response()[::2], (200, b"a1b2"))


class ErrorRendererTests(SynchronousTestCase):
    """Every JSON error, from Klein's handlers, the webhook and the server, is one shape."""

    def test_an_unexpected_error_is_the_same_500_from_klein_and_from_the_webhook(self) -> None:
        probe = Probe()
        probe.error = RuntimeError("probe exploded, password=hunter2")
        klein = Wire(settings(), probe)
        klein.send(get("/readyz"))
        recorder = Recorder()
        recorder.error = RuntimeError("ingest exploded, password=hunter2")
        front = Wire(settings(), Probe(), zadarma=webhook(recorder), peer=ZADARMA_PEER)
        front.send(signed_event())
        answers = [klein.response(), front.response()]
        for status, headers, body in answers:
            self.assertEqual(status, 500)
            self.assertEqual(json.loads(body), {"error": INTERNAL_ERROR, "status": 500})
            self.assertEqual((headers["content-type"], headers["cache-control"]),
                             ("application/json; charset=utf-8", "no-store"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2, "both logged")

    def test_the_rejections_before_a_route_have_the_same_body(self) -> None:
        status, headers, body = parse(raw_response(413, "too big"))
        self.assertEqual((status, body), (413, error_body(413, "too big")))
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")

    def test_an_http_error_carries_its_headers_and_extra_fields_after_the_usual_two(self) -> None:
        request: Any = DummyRequest([b""])
        body = error_answer(request, HttpError(429, "slow down", {"Retry-After": "7"}),
                            login_url="/login")
        self.assertEqual(body, b'{"error":"slow down","status":429,"login_url":"/login"}\n')
        self.assertEqual(request.responseCode, 429)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Retry-After"), [b"7"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Cache-Control"), [b"no-store"])

    def test_a_failure_answer_passes_an_http_error_and_hides_anything_else(self) -> None:
        request: Any = DummyRequest([b""])
        body = failure_answer(request, Failure(HttpError(403, "no")))
        self.assertEqual((request.responseCode, body), (403, error_body(403, "no")))
        self.assertEqual(self.flushLoggedErrors(), [])
        request = DummyRequest([b""])
        request.path = b"/voip/calls/1/recording"
        body = failure_answer(request, Failure(KeyError("secret")))
        self.assertEqual((request.responseCode, body), (500, error_body(500, INTERNAL_ERROR)))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
