"""The fake api.zadarma.com as a client meets it: signatures checked over exactly what was
sent (zadarma.md 2.1 vectors byte for byte), the rate limit and its headers, the answers
of each endpoint, scripted failures (hangs and slow bodies included), the record of what
was received, and TLS with a custom trust root.

Everything is real HTTP on 127.0.0.1 port 0 with the real reactor; the fake's own time
is a ``Clock``, so the rate-limit window and the answers' times are exact. URLs are built
by hand, as dpvoip's client must build them: what is signed is what is sent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from dpvoip.testing.zadarma import (
    LIFETIME_DEFAULT,
    RECORD_BASE,
    Fault,
    ReceivedRequest,
    ZadarmaFake,
    parse_utc_offset,
    serve,
)
from dpvoip.zadarma.signing import api_authorization, php_query
from test.support.tls import Authority, make_authority
from test.support.waiting import settle, until
from test.support.zadarma import (
    BALANCE,
    CALLBACK,
    INTERNAL,
    KEY,
    LOOPBACK,
    RECORD,
    SECRET,
    T0,
    TIMEZONE,
    VECTORS,
)

#: 10:28:29 in the account's zone (UTC+3) at ``T0``.
T0_LOCAL = "2025-06-17 10:28:29"


@dataclass(frozen=True)
class Reply:
    code: int
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if not values else values[0]




def watch(deferred: Deferred[Any]) -> list[object]:
    """What ``deferred`` fired with, once it has ([] until then). ``called`` would not do:
    a Deferred waiting on a chained one counts as called."""
    results: list[object] = []

    def keep(result: object) -> object:
        results.append(result)
        return result

    deferred.addBoth(keep)
    return results


# --- pure pieces ---------------------------------------------------------------------------


class ValueTests(SynchronousTestCase):
    def test_utc_offsets(self) -> None:
        self.assertEqual(parse_utc_offset("UTC").utcoffset(None).total_seconds(), 0)
        self.assertEqual(parse_utc_offset("UTC+0").utcoffset(None).total_seconds(), 0)
        self.assertEqual(parse_utc_offset("UTC+3").utcoffset(None).total_seconds(), 3 * 3600)
        self.assertEqual(parse_utc_offset("UTC-5:30").utcoffset(None).total_seconds(),
                         -(5 * 3600 + 1800))
        for bad in ("Europe/Athens", "UTC+3\n", "GMT+3", "UTC+15", "UTC+3:60", "utc+3", ""):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                parse_utc_offset(bad)

    def test_a_bad_zone_is_refused_at_construction(self) -> None:
        with self.assertRaises(ValueError):
            ZadarmaFake(KEY, SECRET, Clock(), timezone="Europe/Athens")

    def test_fail_next_needs_a_positive_count(self) -> None:
        fake = ZadarmaFake(KEY, SECRET, Clock())
        with self.assertRaises(ValueError):
            fake.fail_next(Fault.hang(), times=0)
        fake.fail_next(Fault.hang(), times=3)
        fake.fail_next(Fault.server_error(), path=BALANCE)
        self.assertEqual(fake.faults_pending, 4)

    def test_faults(self) -> None:
        self.assertEqual(Fault.error("Not enough money"),
                         Fault("error", 200, "Not enough money"))
        self.assertEqual(Fault.error("x", 404).code, 404)
        self.assertEqual(Fault.rate_limited(123), Fault("rate_limited", 429,
                                                        "Too many requests", 123))
        self.assertEqual((Fault.server_error().code, Fault.html().code, Fault.html(502).code),
                         (500, 200, 502))

    def test_signed_string_is_the_query_or_the_body(self) -> None:
        get = ReceivedRequest("GET", BALANCE, "a=1", b"b=2", {}, None, False, 0.0)
        post = ReceivedRequest("POST", BALANCE, "a=1", b"b=2", {}, None, False, 0.0)
        self.assertEqual((get.signed, post.signed), ("a=1", "b=2"))


# --- live ----------------------------------------------------------------------------------


class LiveTestCase(TestCase):
    """A fake listening on loopback, and a client that signs like Zadarma's clients."""

    timeout = 120  # a hang detector: each test takes well under a second idle

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.fake = self.make_fake()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        # Runs first (and closes whichever fake the test ended with): drops held requests
        # and stops the ports, so the pool then has nothing left to wait for.
        self.addCleanup(lambda: self.fake.close())
        self.base = ""

    def make_fake(self) -> ZadarmaFake:
        return ZadarmaFake(KEY, SECRET, self.clock)

    async def start(self, description: str = LOOPBACK, scheme: str = "http",
                    host: str = "127.0.0.1") -> IListeningPort:
        port = await self.fake.listen(reactor, description)
        self.base = f"{scheme}://{host}:{port.getHost().port}"  # type: ignore[attr-defined]
        return port

    def request(self, path: str, query: str = "", *, method: str = "GET", body: bytes = b"",
                authorization: str | None = None, client: HTTPClient | None = None,
                ) -> Deferred[IResponse]:
        """Send ``query`` (or ``body``) exactly as given; signed correctly unless
        ``authorization`` says otherwise ("" sends no header)."""
        if authorization is None:
            signed = body.decode() if method in ("POST", "PUT") else query
            authorization = api_authorization(KEY, SECRET, path, signed)
        headers = Headers()
        if authorization:
            headers.addRawHeader("Authorization", authorization)
        if method in ("POST", "PUT"):
            headers.addRawHeader("Content-Type", "application/x-www-form-urlencoded")
        url = (self.base + path + (f"?{query}" if query else "")).encode("ascii")
        if client is None:
            sending = treq.request(method, url, headers=headers, data=body or None,
                                   pool=self.pool)
        else:
            sending = client.request(method, url, headers=headers, data=body or None)
        return cast("Deferred[IResponse]", sending)

    async def call(self, path: str, query: str = "", **options: Any) -> Reply:
        response = await self.request(path, query, **options)
        body = await treq.content(response)
        return Reply(response.code, response.headers, body)

    async def get(self, path: str, params: Mapping[str, str | int] | None = None) -> Reply:
        """A correctly signed GET of ``params``, encoded as Zadarma wants."""
        return await self.call(path, php_query(params or {}))

    @property
    def last(self) -> ReceivedRequest:
        return self.fake.requests[-1]

    def assert_error(self, reply: Reply, code: int, message: str | None = None) -> None:
        self.assertEqual(reply.code, code)
        self.assertEqual(reply.json["status"], "error")
        if message is not None:
            self.assertEqual(reply.json["message"], message)


class SignatureTests(LiveTestCase):
    async def test_the_spec_vectors_are_accepted_byte_for_byte(self) -> None:
        await self.start()
        for path, method, signed, authorization in VECTORS:
            with self.subTest(path=path, signed=signed):
                body = signed.encode() if method == "POST" else b""
                query = "" if method == "POST" else signed
                reply = await self.call(path, query, method=method, body=body,
                                        authorization=authorization)
                self.assertNotEqual(reply.code, 401)
                self.assertTrue(self.last.authorized)
                self.assertEqual(self.last.signed, signed)
                self.assertEqual(self.last.authorization, authorization)
                if path == CALLBACK:
                    self.assertEqual(reply.code, 200)
                    self.assertEqual(reply.json["status"], "success")

    async def test_a_correct_signature_is_accepted_on_every_endpoint(self) -> None:
        self.fake.add_recording("in_1", "1458313316.343312")
        await self.start()
        for path, params in [
            (CALLBACK, {"from": "100", "to": "+442012345678"}),
            (BALANCE, {}),
            (TIMEZONE, {"format": "json"}),
            (RECORD, {"call_id": "1458313316.343312"}),
            (INTERNAL, {}),
        ]:
            with self.subTest(path=path):
                reply = await self.get(path, params)
                self.assertEqual((reply.code, reply.json["status"]), (200, "success"))
                self.assertTrue(self.last.authorized)

    async def test_wrong_or_missing_signatures_are_refused(self) -> None:
        await self.start()
        query = "from=100&to=%2B442012345678"
        cases = {
            "wrong secret": (query, api_authorization(KEY, "other", CALLBACK, query)),
            "wrong key": (query, api_authorization("otherkey", SECRET, CALLBACK, query)),
            "edited query": ("from=100&to=%2B442012345679",
                             api_authorization(KEY, SECRET, CALLBACK, query)),
            "re-encoded query": ("from=100&to=+442012345678",
                                 api_authorization(KEY, SECRET, CALLBACK, query)),
            "reordered query": ("to=%2B442012345678&from=100",
                                api_authorization(KEY, SECRET, CALLBACK, query)),
            "signed for another path": (query, api_authorization(KEY, SECRET, BALANCE, query)),
            "missing header": (query, ""),
            "signature only": (query,
                               api_authorization(KEY, SECRET, CALLBACK, query).split(":")[1]),
        }
        for case, (sent, authorization) in cases.items():
            with self.subTest(case=case):
                reply = await self.call(CALLBACK, sent, authorization=authorization)
                self.assertEqual(reply.code, 401)
                self.assertEqual(reply.json, {"status": "error", "message": "Not authorized"})
                self.assertFalse(self.last.authorized)
                self.assertEqual(self.last.query, sent)
                self.assertIsNotNone(reply.header("X-RateLimit-Remaining"))

    async def test_unknown_path_and_wrong_verb(self) -> None:
        await self.start()
        reply = await self.get("/v1/no/such/method/")
        self.assert_error(reply, 404, "Method not found")
        self.assertTrue(self.last.authorized)
        reply = await self.call(BALANCE, method="POST", body=b"x=1")
        self.assert_error(reply, 405)


class RecordingOfRequestsTests(LiveTestCase):
    async def test_every_request_is_recorded_as_received(self) -> None:
        await self.start()
        await self.get(CALLBACK, {"from": "100", "to": "+442012345678", "sip": "100"})
        self.clock.advance(5)
        await self.call(BALANCE, "x=1", authorization="")
        await self.call("/v1/sms/send/", method="POST", body=b"message=Hi+%7E+there&number=1")

        first, second, third = self.fake.requests
        self.assertEqual(first, ReceivedRequest(
            method="GET", path=CALLBACK, query="from=100&sip=100&to=%2B442012345678",
            body=b"", params={"from": "100", "sip": "100", "to": "+442012345678"},
            authorization=api_authorization(KEY, SECRET, CALLBACK,
                                            "from=100&sip=100&to=%2B442012345678"),
            authorized=True, at=T0,
        ))
        self.assertEqual((second.query, second.authorization, second.authorized, second.at),
                         ("x=1", None, False, T0 + 5))
        self.assertEqual((third.method, third.query, third.body, third.signed),
                         ("POST", "", b"message=Hi+%7E+there&number=1",
                          "message=Hi+%7E+there&number=1"))
        self.assertEqual(third.params, {"message": "Hi ~ there", "number": "1"})
        self.assertTrue(third.authorized)


class ReportTests(LiveTestCase):
    def make_fake(self) -> ZadarmaFake:
        self.reported: list[tuple[str, int]] = []
        return ZadarmaFake(KEY, SECRET, self.clock,
                           report=lambda r, status: self.reported.append((r.path, status)))

    async def test_every_answered_request_is_reported_with_its_status(self) -> None:
        await self.start()
        await self.get(CALLBACK, {"from": "100", "to": "+442012345678"})
        await self.call(BALANCE, authorization="")
        await self.call("/v1/nowhere/")
        self.assertEqual(self.reported, [(CALLBACK, 200), (BALANCE, 401),
                                         ("/v1/nowhere/", 404)])


class RateLimitTests(LiveTestCase):
    async def test_headers_the_101st_request_and_the_next_window(self) -> None:
        await self.start()
        reset = str(int(T0) + 60)
        for number in range(1, 101):
            reply = await self.get(BALANCE)
            self.assertEqual(reply.code, 200, f"request {number}")
            self.assertEqual(reply.header("X-RateLimit-Remaining"), str(100 - number))
            if number == 1:
                self.assertEqual(reply.header("X-RateLimit-Limit"), "100")
                self.assertEqual(reply.header("X-RateLimit-Reset"), reset)
                self.assertEqual(reply.header("X-Zadarma-Method"), BALANCE)

        reply = await self.get(BALANCE)
        self.assert_error(reply, 429, "Too many requests")
        self.assertEqual((reply.header("X-RateLimit-Remaining"),
                          reply.header("X-RateLimit-Reset")), ("0", reset))

        self.clock.advance(59.5)
        self.assert_error(await self.get(BALANCE), 429)
        self.clock.advance(0.5)  # the window has passed
        reply = await self.get(BALANCE)
        self.assertEqual(reply.code, 200)
        self.assertEqual((reply.header("X-RateLimit-Remaining"),
                          reply.header("X-RateLimit-Reset")), ("99", str(int(T0) + 120)))

    async def test_the_limit_is_per_key_and_comes_before_authorization(self) -> None:
        self.fake = ZadarmaFake(KEY, SECRET, self.clock, rate_limit=2)
        await self.start()
        for _ in range(2):
            self.assertEqual((await self.get(BALANCE)).code, 200)
        self.assert_error(await self.get(BALANCE), 429)
        # Another key has its own window (and, signed wrong, gets 401 within it) ...
        other = api_authorization("other", SECRET, BALANCE, "")
        reply = await self.call(BALANCE, authorization=other)
        self.assert_error(reply, 401)
        self.assertEqual(reply.header("X-RateLimit-Remaining"), "1")
        # ... while a key over its limit is refused with 429 before its signature is read.
        reply = await self.call(BALANCE, authorization=f"{KEY}:bogus")
        self.assert_error(reply, 429)


class EndpointTests(LiveTestCase):
    def make_fake(self) -> ZadarmaFake:
        return ZadarmaFake(KEY, SECRET, self.clock, recordings={
            "in_5c7ab": ["1458313316.343312", "1458313317.1"],
        })

    async def test_callback(self) -> None:
        await self.start()
        reply = await self.get(CALLBACK, {"from": "100", "to": "+442037691881",
                                          "sip": "100", "predicted": 1})
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.json, {"status": "success", "from": 100, "to": 442037691881,
                                      "time": int(T0)})
        self.assertEqual(reply.header("Content-Type"), "application/json; charset=utf-8")
        self.assertEqual(reply.header("X-Zadarma-Method"), CALLBACK)

    async def test_callback_patterns(self) -> None:
        await self.start()
        good = [
            {"from": "100", "to": "44203"},
            {"from": "10000", "to": "+1234567"},
            {"from": "+442037691880", "to": "123456789012345"},
            {"from": "1234567", "to": "+123456789012345", "sip": "12345"},
            {"from": "100", "to": "44203", "sip": "100"},
        ]
        bad = [
            ({"to": "44203"}, "from"),
            ({"from": "", "to": "44203"}, "from"),
            ({"from": "10", "to": "44203"}, "from"),
            ({"from": "123456", "to": "44203"}, "from"),
            ({"from": "+100", "to": "44203"}, "from"),
            ({"from": "1234567890123456", "to": "44203"}, "from"),
            ({"from": "100 ", "to": "44203"}, "from"),
            ({"from": "100\n", "to": "44203"}, "from"),
            ({"from": "100"}, "to"),
            ({"from": "100", "to": "100"}, "to"),
            ({"from": "100", "to": "4420"}, "to"),
            ({"from": "100", "to": "123456"}, "to"),
            ({"from": "100", "to": "44-20-3769"}, "to"),
            ({"from": "100", "to": "44203", "sip": "1000"}, "sip"),
            ({"from": "100", "to": "44203", "sip": "+100"}, "sip"),
            ({"from": "100", "to": "44203", "sip": "abc"}, "sip"),
        ]
        for params in good:
            with self.subTest(good=params):
                self.assertEqual((await self.get(CALLBACK, params)).code, 200)
        for params, name in bad:
            with self.subTest(bad=params):
                reply = await self.get(CALLBACK, params)
                self.assert_error(reply, 400)
                self.assertIn(f"'{name}'", reply.json["message"])

    async def test_balance(self) -> None:
        await self.start()
        reply = await self.get(BALANCE)
        self.assertEqual(reply.json, {"status": "success", "balance": 10.34, "currency": "USD"})

    async def test_timezone(self) -> None:
        await self.start()
        reply = await self.get(TIMEZONE)
        self.assertEqual(reply.json, {"status": "success", "unixtime": int(T0),
                                      "datetime": T0_LOCAL, "timezone": "UTC+3"})

    async def test_timezone_is_configurable(self) -> None:
        self.fake = ZadarmaFake(KEY, SECRET, self.clock, timezone="UTC-5:30")
        await self.start()
        reply = await self.get(TIMEZONE)
        self.assertEqual((reply.json["datetime"], reply.json["timezone"]),
                         ("2025-06-17 01:58:29", "UTC-5:30"))

    async def test_extensions(self) -> None:
        await self.start()
        reply = await self.get(INTERNAL)
        self.assertEqual(reply.json, {"status": "success", "pbx_id": 1234,
                                      "numbers": [100, 101, 102]})

    async def test_record_found_by_call_id(self) -> None:
        await self.start()
        reply = await self.get(RECORD, {"call_id": "1458313316.343312"})
        self.assertEqual(reply.json, {
            "status": "success", "link": f"{RECORD_BASE}1458313316.343312.mp3",
            "lifetime_till": "2025-06-17 10:58:29",  # half an hour later, local time
        })
        # No lifetime given is the same as asking for the default one.
        explicit = await self.get(RECORD, {"call_id": "1458313316.343312",
                                           "lifetime": LIFETIME_DEFAULT})
        self.assertEqual(explicit.json["lifetime_till"], "2025-06-17 10:58:29")
        reply = await self.get(RECORD, {"call_id": "1458313317.1", "lifetime": 5184000})
        self.assertEqual(reply.json["lifetime_till"], "2025-08-16 10:28:29")

    async def test_record_found_by_pbx_call_id(self) -> None:
        self.fake.add_recording("out_77", "1500000000.9")
        await self.start()
        reply = await self.get(RECORD, {"pbx_call_id": "in_5c7ab", "lifetime": 180})
        self.assertEqual(reply.json, {
            "status": "success",
            "links": [f"{RECORD_BASE}1458313316.343312.mp3", f"{RECORD_BASE}1458313317.1.mp3"],
            "lifetime_till": "2025-06-17 10:31:29",
        })
        reply = await self.get(RECORD, {"pbx_call_id": "out_77"})
        self.assertEqual(reply.json["links"], [f"{RECORD_BASE}1500000000.9.mp3"])

    async def test_record_not_found_and_bad_parameters(self) -> None:
        await self.start()
        for params in ({"call_id": "1.2"}, {"pbx_call_id": "in_nope"},
                       {"call_id": "in_5c7ab"}):
            with self.subTest(params=params):
                self.assert_error(await self.get(RECORD, params), 404, "Record not found")
        call_id = "1458313316.343312"
        bad: list[dict[str, str | int]] = [
            {}, {"call_id": ""}, {"call_id": call_id, "lifetime": 179},
            {"call_id": call_id, "lifetime": 5184001}, {"call_id": call_id, "lifetime": "soon"},
            {"call_id": call_id, "lifetime": "-200"}, {"call_id": call_id, "lifetime": "1e3"},
        ]
        for wrong in bad:
            with self.subTest(params=wrong):
                self.assert_error(await self.get(RECORD, wrong), 400)


class ScriptedFailureTests(LiveTestCase):
    async def test_status_error_with_each_http_code(self) -> None:
        await self.start()
        for code in (200, 400, 401, 404):
            with self.subTest(code=code):
                self.fake.fail_next(Fault.error("Not enough money", code))
                reply = await self.get(BALANCE)
                self.assertEqual(reply.code, code)
                self.assertEqual(reply.json, {"status": "error",
                                              "message": "Not enough money"})
                self.assertIsNotNone(reply.header("X-RateLimit-Limit"))
                self.assertEqual((await self.get(BALANCE)).code, 200)  # only the next one

    async def test_a_fault_for_one_path_waits_for_it_and_repeats(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.server_error(), path=CALLBACK, times=2)
        self.assertEqual((await self.get(BALANCE)).code, 200)
        params = {"from": "100", "to": "44203"}
        self.assert_error(await self.get(CALLBACK, params), 500)
        self.assert_error(await self.get(CALLBACK, params), 500)
        self.assertEqual(self.fake.faults_pending, 0)
        self.assertEqual((await self.get(CALLBACK, params)).code, 200)

    async def test_faults_answer_whatever_the_signature(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.server_error())
        self.assert_error(await self.call(BALANCE, authorization=""), 500)
        self.assertFalse(self.last.authorized)

    async def test_html_instead_of_json(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.html())
        self.fake.fail_next(Fault.html(502))
        for code in (200, 502):
            reply = await self.get(BALANCE)
            self.assertEqual(reply.code, code)
            self.assertEqual(reply.header("Content-Type"), "text/html")
            self.assertTrue(reply.body.startswith(b"<html>"))
            with self.assertRaises(json.JSONDecodeError):
                json.loads(reply.body)

    async def test_rate_limited_with_a_given_reset(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.rate_limited(int(T0) + 30))
        reply = await self.get(BALANCE)
        self.assert_error(reply, 429, "Too many requests")
        self.assertEqual((reply.header("X-RateLimit-Remaining"),
                          reply.header("X-RateLimit-Reset")), ("0", str(int(T0) + 30)))
        self.assertEqual((await self.get(BALANCE)).code, 200)

    async def test_hang_until_close(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.hang(), path=CALLBACK)
        answer = self.request(CALLBACK, php_query({"from": "100", "to": "44203"}))
        answered = watch(answer)
        await until(lambda: self.fake.held == 1)
        self.assertEqual((await self.get(BALANCE)).code, 200)  # others are still answered
        await settle()
        self.assertEqual(answered, [])
        await self.fake.close()
        self.assertEqual(self.fake.held, 0)
        await self.assertFailure(answer, ResponseNeverReceived)

    async def test_hang_a_client_gives_up_on(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.hang())
        answer = self.request(BALANCE)
        await until(lambda: self.fake.held == 1)
        answer.cancel()
        await self.assertFailure(answer, ResponseNeverReceived)
        # The held request goes when the fake notices the closed connection, or at close().

    async def test_slow_body(self) -> None:
        await self.start()
        self.fake.fail_next(Fault.slow_body())
        response = await self.request(BALANCE)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length,
                         len(b'{"status":"success","balance":10.34,"currency":"USD"}'))
        body = treq.content(response)
        received = watch(body)
        await settle()
        self.assertEqual(received, [])
        self.assertEqual(self.fake.held, 1)
        await self.fake.close()
        await self.assertFailure(body, ResponseFailed)


class ServeTests(LiveTestCase):
    async def test_serve_listens_where_told_on_the_real_clock(self) -> None:
        port = await serve(reactor, LOOPBACK, KEY, SECRET, timezone="UTC+2",
                           recordings={"in_1": ["1.5"]})
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        before = int(reactor.seconds())
        reply = await self.get(TIMEZONE)
        self.assertEqual(reply.json["timezone"], "UTC+2")
        self.assertTrue(before <= reply.json["unixtime"] <= int(reactor.seconds()))
        self.assertEqual((await self.get(RECORD, {"call_id": "1.5"})).code, 200)

    def test_serve_refuses_a_bad_zone(self) -> None:
        with self.assertRaises(ValueError):
            serve(reactor, LOOPBACK, KEY, SECRET, timezone="Europe/Athens")


class TlsTests(LiveTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.authority = make_authority()

    def client(self, authority: Authority | None = None) -> HTTPClient:
        policy = (authority or self.authority).client_policy()
        return HTTPClient(Agent(reactor, contextFactory=policy, pool=self.pool))

    def directory(self) -> Path:
        """A temporary directory removed after the test (trial's mktemp would leave its
        files in the working tree, since pytest runs from the repository)."""
        path = Path(tempfile.mkdtemp(prefix="dpvoip-tls-"))
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def files(self, **names: Any) -> str:
        certificate = self.authority.issue(**names)
        return certificate.write(self.directory()).endpoint_description()

    async def test_a_matching_name_under_the_test_ca_is_accepted(self) -> None:
        await self.start(self.files(dns_names=["localhost"]), "https", "localhost")
        reply = await self.call(BALANCE, client=self.client())
        self.assertEqual(reply.json["status"], "success")
        self.assertTrue(self.last.authorized)

    async def test_an_ip_address_certificate_is_accepted_by_address(self) -> None:
        await self.start(self.files(dns_names=[], ip_addresses=["127.0.0.1"]), "https")
        reply = await self.call(BALANCE, client=self.client())
        self.assertEqual(reply.code, 200)

    async def test_the_helper_endpoint_serves_the_fake(self) -> None:
        certificate = self.authority.issue(dns_names=["localhost"])
        port = await certificate.endpoint(reactor).listen(self.fake.site())
        self.addCleanup(port.stopListening)
        self.base = f"https://localhost:{port.getHost().port}"
        self.assertEqual((await self.call(BALANCE, client=self.client())).code, 200)

    async def test_a_mismatching_name_is_refused(self) -> None:
        description = self.files(dns_names=["zadarma.test"])
        for host in ("127.0.0.1", "localhost"):
            with self.subTest(host=host):
                await self.start(description, "https", host)
                sending = self.request(BALANCE, client=self.client())
                await self.assertFailure(sending, ResponseNeverReceived)
        self.assertEqual(self.fake.requests, [])  # refused before any HTTP was spoken

    async def test_a_certificate_from_another_ca_is_refused(self) -> None:
        await self.start(self.files(dns_names=["localhost"]), "https", "localhost")
        sending = self.request(BALANCE, client=self.client(make_authority("another CA")))
        await self.assertFailure(sending, ResponseNeverReceived)
        self.assertEqual(self.fake.requests, [])

    def test_the_files_and_the_description(self) -> None:
        certificate = self.authority.issue(dns_names=["localhost", "zadarma.test"],
                                           ip_addresses=["127.0.0.1"])
        files = certificate.write(self.directory() / "a:b")
        self.assertEqual(files.certificate.read_bytes(), certificate.certificate_pem)
        self.assertEqual(files.ca.read_bytes(), self.authority.certificate_pem)
        self.assertEqual(files.key.stat().st_mode & 0o777, 0o600)
        self.assertIn(r"a\:b", files.endpoint_description())
        self.assertTrue(files.endpoint_description().startswith("ssl:0:interface=127.0.0.1:"))
        with self.assertRaises(ValueError):
            self.authority.issue(dns_names=[])
