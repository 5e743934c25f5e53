"""dpvoip's Zadarma REST client against the shipped fake, over real HTTP on 127.0.0.1.

The client is built as the daemon builds it (``http_pool_and_agent`` and treq's
``HTTPClient``), so what is checked is what runs: the string signed is the string the fake
receives, every way Zadarma or the path to it fails becomes the right ``ZadarmaApiError``
(with the status dpvoip answers), the deadline covers the body too, both rate limits hold,
TLS is verified against the configured CA file, and ``ZadarmaAccountService`` learns the
account's zone, retries, refreshes and closes its connections when stopped.

The fake's time (and, where a test needs exact times, the client's: the deadline, the
rate limits) is a ``Clock``; the network always runs on the real reactor. Whatever runs on
the real clock (the connect timeout, a deadline where the test is about something else) is
given ``PATIENT`` seconds: a hang detector that a loaded machine never reaches.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from dpvoip.testing.zadarma import RECORD_BASE, Fault, ZadarmaFake
from dpvoip.zadarma.account import (
    REFRESH_SECONDS,
    RETRY_SECONDS,
    ZadarmaAccountService,
    http_pool_and_agent,
)
from dpvoip.zadarma.api import (
    API_URL,
    MAX_ANSWER_BYTES,
    SANDBOX_URL,
    CallbackAccepted,
    ZadarmaApi,
    ZadarmaApiError,
    ZadarmaBadAnswer,
    ZadarmaNotConfigured,
    ZadarmaRateLimited,
    ZadarmaRefused,
    ZadarmaTimeout,
    ZadarmaUnreachable,
    base_url,
)
from test.support.ports import HeldPort
from test.support.tls import make_authority
from test.support.waiting import settle, until
from test.support.zadarma import (
    BALANCE,
    CALLBACK,
    KEY,
    LOOPBACK,
    RECORD,
    SECRET,
    SMS,
    STATISTICS,
    T0,
    TIMEZONE,
    authorization,
)

# 15 January 2026 10:00 UTC: winter, when Athens is UTC+2 (T0 is summer, UTC+3).
WINTER = datetime(2026, 1, 15, 10, 0, tzinfo=UTC).timestamp()
ATHENS = ZoneInfo("Europe/Athens")
PLUS_3 = timedelta(hours=3)

AUTH_CALLBACK = authorization(CALLBACK, "from=100&to=%2B442012345678")
AUTH_CALLBACK_SIP = authorization(CALLBACK, "from=100&predicted=1&sip=100&to=442012345678")
AUTH_BALANCE = authorization(BALANCE, "")
AUTH_STATISTICS = authorization(
    STATISTICS, "end=2024-01-01+23%3A59%3A59&start=2024-01-01+00%3A00%3A00&version=2")
AUTH_SMS = authorization(SMS, "message=Hi+%7E+there&number=442012345678")

E = TypeVar("E", bound=ZadarmaApiError)

#: A time limit on the real clock that only a hang reaches (loopback answers in
#: milliseconds, a loaded machine in seconds).
PATIENT = 60.0


def real_clock() -> IReactorTime:
    return cast(IReactorTime, reactor)


@implementer(IAgent)
class _Counting:
    """An agent that counts, on its test, each answer's arrival (status line and headers):
    the event a test waits for before it lets a deadline pass during the body."""

    def __init__(self, agent: IAgent, case: ApiTestCase) -> None:
        self._agent = agent
        self._case = case

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        answer: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return answer.addCallback(self._arrived)

    def _arrived(self, response: IResponse) -> IResponse:
        self._case.answers += 1
        return response


class _HeaderRecorder(Resource):
    """The fake's API behind a resource that also keeps each request's headers."""

    isLeaf = True

    def __init__(self, fake: ZadarmaFake) -> None:
        super().__init__()
        self.fake = fake
        self.content_types: list[bytes | None] = []

    def render(self, request: Request) -> bytes | int:
        self.content_types.append(request.getHeader(b"content-type"))
        return self.fake.handle(request)


class _BigAnswer(Resource):
    """Not Zadarma: a JSON answer larger than the client accepts."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"status":"success","pad":"' + b"x" * MAX_ANSWER_BYTES + b'"}'


class ApiTestCase(TestCase):
    """A fake on loopback (its time a ``Clock`` at T0) and clients built as the daemon does."""

    timeout = 120  # a hang detector: each test takes well under a second idle

    def setUp(self) -> None:
        self.answers = 0  # answers (status and headers) the clients built here received
        self.clock = Clock()
        self.clock.advance(T0)
        self.fake = self.make_fake()
        # Cleanups run last-added first: the pools (added later) close before the fake,
        # which then drops whatever request it still holds.
        self.addCleanup(lambda: self.fake.close())

    def make_fake(self) -> ZadarmaFake:
        return ZadarmaFake(KEY, SECRET, self.clock)

    async def start(self, description: str = LOOPBACK, scheme: str = "http",
                    host: str = "127.0.0.1") -> str:
        port = await self.fake.listen(reactor, description)
        return f"{scheme}://{host}:{port.getHost().port}"  # type: ignore[attr-defined]

    async def serve(self, site: Site | Factory[Any]) -> tuple[str, IListeningPort]:
        """Listen on loopback with another site or factory (stopped at cleanup)."""
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}", port

    def make_pool(self, ca_file: str = "") -> tuple[HTTPConnectionPool, HTTPClient]:
        """A pool and client as the daemon builds them, but for the connect timeout (on the
        real reactor: ``PATIENT``), and counting the answers that arrive."""
        pool, agent = http_pool_and_agent(reactor, ca_file, PATIENT)
        self.addCleanup(pool.closeCachedConnections)
        return pool, HTTPClient(_Counting(agent, self))

    def api(self, url: str, *, clock: IReactorTime | None = None, timeout: float = 5.0,
            per_minute: int = 100, ca_file: str = "", key: str = KEY,
            secret: str = SECRET) -> ZadarmaApi:
        _, http = self.make_pool(ca_file)
        return ZadarmaApi(http, clock or self.clock, key, secret, url, timeout, per_minute)

    def directory(self) -> Path:
        """A temporary directory removed after the test (not trial's mktemp, which would
        leave files in the working tree under pytest)."""
        path = Path(tempfile.mkdtemp(prefix="dpvoip-zadarma-api-"))
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    async def fails(self, attempt: Awaitable[object], kind: type[E]) -> E:
        """The error ``attempt`` raises, which must be exactly of class ``kind``."""
        try:
            result = await attempt
        except ZadarmaApiError as error:
            self.assertIs(type(error), kind, f"{type(error).__name__}: {error.message}")
            self.assertEqual(str(error), error.message)
            return cast(E, error)
        raise self.failureException(f"expected {kind.__name__}, got the result {result!r}")


# --- base_url --------------------------------------------------------------------------------


class BaseUrlTests(SynchronousTestCase):
    def test_official_and_sandbox(self) -> None:
        self.assertEqual(base_url("", False), "https://api.zadarma.com")
        self.assertEqual(base_url("", True), "https://api-sandbox.zadarma.com")
        self.assertEqual((API_URL, SANDBOX_URL),
                         ("https://api.zadarma.com", "https://api-sandbox.zadarma.com"))

    def test_a_configured_url_wins_without_its_trailing_slash(self) -> None:
        for sandbox in (False, True):
            with self.subTest(sandbox=sandbox):
                self.assertEqual(base_url("https://proxy.example:8443/", sandbox),
                                 "https://proxy.example:8443")
                self.assertEqual(base_url("http://127.0.0.1:9000", sandbox),
                                 "http://127.0.0.1:9000")
                self.assertEqual(base_url("https://proxy.example//", sandbox),
                                 "https://proxy.example")


# --- what is signed is what is sent ------------------------------------------------------------


class SigningTests(ApiTestCase):
    async def test_callback_sends_exactly_what_it_signed(self) -> None:
        api = self.api(await self.start())
        accepted = await api.callback("100", "+442012345678")
        last = self.fake.requests[-1]
        self.assertEqual((last.method, last.path, last.query, last.body),
                         ("GET", CALLBACK, "from=100&to=%2B442012345678", b""))
        self.assertEqual(last.authorization, AUTH_CALLBACK)
        self.assertTrue(last.authorized)
        self.assertEqual(last.params, {"from": "100", "to": "+442012345678"})
        # The fake answers the numbers as JSON numbers without the '+', as Zadarma does.
        self.assertEqual(accepted, CallbackAccepted("100", "442012345678", int(T0)))

    async def test_callback_with_sip_and_predicted_is_the_spec_vector(self) -> None:
        api = self.api(await self.start())
        accepted = await api.callback("100", "442012345678", sip="100", predicted=True)
        last = self.fake.requests[-1]
        self.assertEqual(last.query, "from=100&predicted=1&sip=100&to=442012345678")
        self.assertEqual(last.authorization, AUTH_CALLBACK_SIP)
        self.assertTrue(last.authorized)
        self.assertEqual(accepted, CallbackAccepted("100", "442012345678", int(T0)))
        self.assertEqual(len(self.fake.requests), 1)

    async def test_no_parameters_sends_no_query(self) -> None:
        api = self.api(await self.start())
        reply = await api.request(BALANCE)
        last = self.fake.requests[-1]
        self.assertEqual((last.query, last.authorization, last.authorized),
                         ("", AUTH_BALANCE, True))
        self.assertEqual(reply.body, {"status": "success", "balance": 10.34, "currency": "USD"})
        self.assertEqual(reply.remaining, 99)
        self.assertEqual(reply.reset, float(int(T0) + 60))

    async def test_spaces_colons_and_tildes_in_a_query_are_sent_as_php_encodes_them(
            self) -> None:
        api = self.api(await self.start())
        # Not a route of the fake (404), but the query must arrive as signed.
        error = await self.fails(api.request(STATISTICS, {
            "start": "2024-01-01 00:00:00", "end": "2024-01-01 23:59:59", "version": 2}),
            ZadarmaRefused)
        self.assertEqual(error.message, "Method not found")
        last = self.fake.requests[-1]
        self.assertEqual(last.query,
                         "end=2024-01-01+23%3A59%3A59&start=2024-01-01+00%3A00%3A00&version=2")
        self.assertEqual(last.authorization, AUTH_STATISTICS)
        self.assertTrue(last.authorized)
        # A tilde and a plus in a GET query: an HTTP library's URL normalisation must not
        # turn %7E back into '~' (Zadarma would then refuse the signature).
        await api.request(BALANCE, {"note": "a ~ b+c"})
        last = self.fake.requests[-1]
        self.assertEqual(last.query, "note=a+%7E+b%2Bc")
        self.assertTrue(last.authorized)

    async def test_a_post_sends_the_signed_string_as_a_form_body(self) -> None:
        recorder = _HeaderRecorder(self.fake)
        url, _ = await self.serve(Site(recorder))
        api = self.api(url)
        # The fake has no SMS route: it answers 404, after recording what arrived.
        error = await self.fails(
            api.request(SMS, {"number": "442012345678", "message": "Hi ~ there"}, verb="POST"),
            ZadarmaRefused)
        self.assertEqual((error.message, error.status), ("Method not found", 502))
        last = self.fake.requests[-1]
        self.assertEqual((last.method, last.path, last.query), ("POST", SMS, ""))
        self.assertEqual(last.body, b"message=Hi+%7E+there&number=442012345678")
        self.assertEqual(last.authorization, AUTH_SMS)
        self.assertTrue(last.authorized)
        self.assertEqual(last.params, {"message": "Hi ~ there", "number": "442012345678"})
        self.assertEqual(recorder.content_types, [b"application/x-www-form-urlencoded"])

    async def test_a_wrong_secret_is_refused_by_zadarma(self) -> None:
        api = self.api(await self.start(), secret="not the secret")
        error = await self.fails(api.callback("100", "+442012345678"), ZadarmaRefused)
        self.assertEqual((error.message, error.status), ("Not authorized", 502))
        self.assertFalse(self.fake.requests[-1].authorized)
        self.assertNotIn("not the secret", error.message)


# --- errors -------------------------------------------------------------------------------------


class ErrorMappingTests(ApiTestCase):
    async def test_status_error_with_http_200_is_refused_with_zadarmas_message(self) -> None:
        api = self.api(await self.start())
        self.fake.fail_next(Fault.error("Not enough money", code=200))
        error = await self.fails(api.callback("100", "+442012345678"), ZadarmaRefused)
        self.assertEqual((error.message, error.status, error.retry_after),
                         ("Not enough money", 502, None))
        self.assertEqual(len(self.fake.requests), 1)

    async def test_http_error_codes_with_an_error_body(self) -> None:
        api = self.api(await self.start())
        for code in (400, 401, 404):
            with self.subTest(code=code):
                self.fake.fail_next(Fault.error(f"Problem {code}", code=code))
                error = await self.fails(api.request(BALANCE), ZadarmaRefused)
                self.assertEqual((error.message, error.status), (f"Problem {code}", 502))

    async def test_a_real_400_from_a_wrong_parameter(self) -> None:
        api = self.api(await self.start())
        error = await self.fails(api.callback("10", "+442012345678"), ZadarmaRefused)
        self.assertEqual(error.message, "Wrong parameter 'from'")

    async def test_an_error_without_a_message_names_the_method_and_code(self) -> None:
        api = self.api(await self.start())
        self.fake.fail_next(Fault.error("", code=404))
        error = await self.fails(api.request(BALANCE), ZadarmaRefused)
        self.assertEqual(error.message, f"Zadarma answered {BALANCE} with HTTP 404")

    async def test_http_500(self) -> None:
        api = self.api(await self.start())
        self.fake.fail_next(Fault.server_error())
        # A JSON error body with 500: the client shows Zadarma's message, as dpvoip's 502.
        error = await self.fails(api.request(BALANCE), ZadarmaRefused)
        self.assertEqual((error.message, error.status), ("Internal server error", 502))

    async def test_html_instead_of_json(self) -> None:
        api = self.api(await self.start())
        for code in (200, 502):
            with self.subTest(code=code):
                self.fake.fail_next(Fault.html(code))
                error = await self.fails(api.request(BALANCE), ZadarmaBadAnswer)
                self.assertEqual((error.message, error.status),
                                 (f"Zadarma answered {BALANCE} with HTTP {code} and no JSON",
                                  502))

    async def test_an_answer_too_large_is_refused(self) -> None:
        url, _ = await self.serve(Site(_BigAnswer()))
        api = self.api(url)
        error = await self.fails(api.request(BALANCE), ZadarmaBadAnswer)
        self.assertEqual((error.message, error.status), ("Zadarma's answer is too large", 502))

    async def test_429_blocks_further_requests_locally_until_the_reset(self) -> None:
        api = self.api(await self.start())
        self.fake.fail_next(Fault.rate_limited(int(T0) + 30))
        error = await self.fails(api.request(BALANCE), ZadarmaRateLimited)
        self.assertEqual(error.status, 429)
        self.assertEqual(error.retry_after, 30.0)
        self.assertIn("try again in 30 s", error.message)
        self.assertEqual(len(self.fake.requests), 1)

        self.clock.advance(29.5)
        error = await self.fails(api.callback("100", "+442012345678"), ZadarmaRateLimited)
        self.assertEqual((error.status, error.retry_after), (429, 0.5))
        self.assertIn("try again in 1 s", error.message)
        self.assertEqual(len(self.fake.requests), 1)  # refused without asking Zadarma

        self.clock.advance(0.5)
        await api.request(BALANCE)
        self.assertEqual(len(self.fake.requests), 2)

    async def test_429_with_a_past_reset_waits_a_minute(self) -> None:
        api = self.api(await self.start())
        self.fake.fail_next(Fault.rate_limited(int(T0) - 5))
        error = await self.fails(api.request(BALANCE), ZadarmaRateLimited)
        self.assertEqual(error.retry_after, 60.0)
        self.clock.advance(59)
        await self.fails(api.request(BALANCE), ZadarmaRateLimited)
        self.assertEqual(len(self.fake.requests), 1)
        self.clock.advance(1)
        await api.request(BALANCE)
        self.assertEqual(len(self.fake.requests), 2)

    async def test_the_fakes_own_limit_answers_429(self) -> None:
        self.fake = ZadarmaFake(KEY, SECRET, self.clock, rate_limit=2)
        api = self.api(await self.start())
        await api.request(BALANCE)
        await api.request(BALANCE)
        error = await self.fails(api.request(BALANCE), ZadarmaRateLimited)
        self.assertEqual(error.retry_after, 60.0)  # the fake's window opened at T0
        self.assertEqual(len(self.fake.requests), 3)

    async def times_out(self, fault: Fault, answers: int = 0) -> None:
        """``fault`` on a request with a 0.5 s deadline: a 504 at 0.5 s, not before; the
        deadline passes once the client has received ``answers`` answers' headers."""
        api = self.api(await self.start(), timeout=0.5)
        self.fake.fail_next(fault)
        attempt = Deferred.fromCoroutine(api.request(BALANCE))
        await until(lambda: self.fake.held == 1)
        await until(lambda: self.answers == answers)
        self.clock.advance(0.499)
        self.assertNoResult(attempt)
        self.clock.advance(0.001)
        error = await self.fails(attempt, ZadarmaTimeout)
        self.assertEqual((error.status, error.message),
                         (504, "Zadarma did not answer within 0.5 s"))

    async def test_a_hang_times_out_within_the_timeout(self) -> None:
        await self.times_out(Fault.hang())
        self.assertEqual(len(self.fake.requests), 1)
        # The client gave up on the connection: the fake no longer holds the request.
        await until(lambda: self.fake.held == 0)

    async def test_a_stalled_body_times_out_too(self) -> None:
        await self.times_out(Fault.slow_body(), answers=1)
        # Headers had come: the deadline covered the body. And the stalled connection is
        # dropped by the client, not left open until the server goes away (treq's own
        # collector cannot be cancelled: it would leave the socket open).
        await until(lambda: self.fake.held == 0)

    async def test_a_caller_who_gives_up_drops_the_connection(self) -> None:
        # Klein cancels the handler of a client that went away: the request it was waiting
        # for is abandoned too, its connection aborted rather than left to a hung server.
        api = self.api(await self.start())
        self.fake.fail_next(Fault.hang())
        attempt = Deferred.fromCoroutine(api.request(BALANCE))
        await until(lambda: self.fake.held == 1)
        attempt.cancel()
        await self.fails(attempt, ZadarmaUnreachable)  # read by nobody: the caller is gone
        await until(lambda: self.fake.held == 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the deadline went with it

    async def test_a_closed_port_is_unreachable(self) -> None:
        closed = HeldPort()  # bound, never listening: refused, and nobody else's meanwhile
        self.addCleanup(closed.close)
        api = self.api(f"http://127.0.0.1:{closed.port}", clock=real_clock(), timeout=PATIENT)
        error = await self.fails(api.request(BALANCE), ZadarmaUnreachable)
        self.assertEqual(error.status, 502)
        self.assertTrue(error.message.startswith("cannot connect to Zadarma: "), error.message)
        self.assertIn("refused", error.message.lower())

    async def test_an_unknown_host_is_unreachable(self) -> None:
        api = self.api("http://no-such-host.invalid", clock=real_clock(), timeout=PATIENT)
        error = await self.fails(api.request(BALANCE), ZadarmaUnreachable)
        self.assertEqual((error.message, error.status),
                         ("Zadarma's API host name does not resolve", 502))

    async def test_no_keys_is_not_configured_and_sends_nothing(self) -> None:
        url = await self.start()
        for key, secret in (("", SECRET), (KEY, ""), ("", "")):
            with self.subTest(key=key, secret=secret):
                api = self.api(url, key=key, secret=secret)
                self.assertFalse(api.configured)
                error = await self.fails(api.callback("100", "+442012345678"),
                                         ZadarmaNotConfigured)
                self.assertEqual(error.status, 503)
                self.assertIn("not configured", error.message)
        self.assertEqual(self.fake.requests, [])
        self.assertTrue(self.api(url).configured)


class LocalRateLimitTests(ApiTestCase):
    async def test_the_fourth_request_of_three_a_minute_is_not_sent(self) -> None:
        api = self.api(await self.start(), per_minute=3)
        for _ in range(3):
            await api.request(BALANCE)
        error = await self.fails(api.callback("100", "+442012345678"), ZadarmaRateLimited)
        self.assertEqual((error.status, error.retry_after), (429, 60.0))
        self.assertIn("too many requests to Zadarma", error.message)
        self.assertEqual(len(self.fake.requests), 3)
        self.clock.advance(59.9)
        await self.fails(api.request(BALANCE), ZadarmaRateLimited)
        self.assertEqual(len(self.fake.requests), 3)
        self.clock.advance(0.1)  # a minute after the first
        await api.request(BALANCE)
        self.assertEqual(len(self.fake.requests), 4)

    async def test_failed_requests_count_too(self) -> None:
        api = self.api(await self.start(), per_minute=2)
        self.fake.fail_next(Fault.server_error(), times=2)
        await self.fails(api.request(BALANCE), ZadarmaRefused)
        await self.fails(api.request(BALANCE), ZadarmaRefused)
        await self.fails(api.request(BALANCE), ZadarmaRateLimited)
        self.assertEqual(len(self.fake.requests), 2)


# --- the methods dpvoip uses ----------------------------------------------------------------


class MethodTests(ApiTestCase):
    def make_fake(self) -> ZadarmaFake:
        return ZadarmaFake(KEY, SECRET, self.clock, recordings={
            "in_5c7ab": ["1458313316.343312", "1458313317.1"],
        })

    async def test_recording_link_by_call_id(self) -> None:
        api = self.api(await self.start())
        link = await api.recording_link(call_id="1458313316.343312")
        self.assertEqual(link, f"{RECORD_BASE}1458313316.343312.mp3")
        last = self.fake.requests[-1]
        self.assertEqual((last.path, last.query),
                         (RECORD, "call_id=1458313316.343312&lifetime=1800"))
        self.assertTrue(last.authorized)
        await api.recording_link(call_id="1458313317.1", lifetime=180)
        self.assertEqual(self.fake.requests[-1].query, "call_id=1458313317.1&lifetime=180")

    async def test_recording_link_by_pbx_call_id_is_the_first(self) -> None:
        api = self.api(await self.start())
        link = await api.recording_link(pbx_call_id="in_5c7ab")
        self.assertEqual(link, f"{RECORD_BASE}1458313316.343312.mp3")
        self.assertEqual(self.fake.requests[-1].query, "lifetime=1800&pbx_call_id=in_5c7ab")

    async def test_an_unknown_recording(self) -> None:
        api = self.api(await self.start())
        for asking in (api.recording_link(call_id="1.2"),
                       api.recording_link(pbx_call_id="in_nope")):
            error = await self.fails(asking, ZadarmaRefused)
            self.assertEqual((error.message, error.status), ("Record not found", 502))
        self.assertEqual([r.query for r in self.fake.requests],
                         ["call_id=1.2&lifetime=1800", "lifetime=1800&pbx_call_id=in_nope"])

    async def test_timezone(self) -> None:
        api = self.api(await self.start())
        self.assertEqual(await api.timezone(), "UTC+3")
        last = self.fake.requests[-1]
        self.assertEqual((last.path, last.query, last.authorized), (TIMEZONE, "", True))

    async def test_timezone_as_the_fake_is_configured(self) -> None:
        self.fake = ZadarmaFake(KEY, SECRET, self.clock, timezone="UTC-5:30")
        api = self.api(await self.start())
        self.assertEqual(await api.timezone(), "UTC-5:30")


# --- TLS ----------------------------------------------------------------------------------------


class TlsTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.authority = make_authority()

    def description(self, *dns_names: str) -> tuple[str, str]:
        """The fake's TLS endpoint description for a certificate with these names, and
        the path of the test CA's PEM."""
        files = self.authority.issue(dns_names=dns_names).write(self.directory())
        return files.endpoint_description(), str(files.ca)

    async def test_the_right_name_under_the_configured_ca(self) -> None:
        description, ca_file = self.description("localhost")
        api = self.api(await self.start(description, "https", "localhost"), ca_file=ca_file)
        self.assertEqual(await api.timezone(), "UTC+3")
        self.assertTrue(self.fake.requests[-1].authorized)

    async def test_a_ca_bundle_with_several_certificates(self) -> None:
        description, ca_file = self.description("localhost")
        bundle = self.directory() / "bundle.pem"
        bundle.write_bytes(make_authority("another CA").certificate_pem
                           + Path(ca_file).read_bytes())
        api = self.api(await self.start(description, "https", "localhost"),
                       ca_file=str(bundle))
        self.assertEqual(await api.timezone(), "UTC+3")

    async def test_a_certificate_for_another_name_is_refused(self) -> None:
        description, ca_file = self.description("zadarma.test")
        api = self.api(await self.start(description, "https", "localhost"), ca_file=ca_file,
                       clock=real_clock(), timeout=PATIENT)
        error = await self.fails(api.timezone(), ZadarmaUnreachable)
        self.assertEqual(error.status, 502)
        self.assertIn("certificate", error.message)
        self.assertEqual(self.fake.requests, [])

    async def test_the_test_ca_is_not_trusted_without_the_ca_file(self) -> None:
        description, _ = self.description("localhost")
        api = self.api(await self.start(description, "https", "localhost"),
                       clock=real_clock(), timeout=PATIENT)
        error = await self.fails(api.timezone(), ZadarmaUnreachable)
        self.assertIn("certificate", error.message)
        self.assertEqual(self.fake.requests, [])

    async def test_another_ca_in_the_ca_file_is_not_trusted(self) -> None:
        description, _ = self.description("localhost")
        other = self.directory() / "other.pem"
        other.write_bytes(make_authority("another CA").certificate_pem)
        api = self.api(await self.start(description, "https", "localhost"),
                       ca_file=str(other), clock=real_clock(), timeout=PATIENT)
        error = await self.fails(api.timezone(), ZadarmaUnreachable)
        self.assertIn("certificate", error.message)
        self.assertEqual(self.fake.requests, [])


# --- the account service ------------------------------------------------------------------------


class AccountServiceTests(ApiTestCase):
    """The service's timers run on ``self.clock`` (also the fake's time); the client's
    requests go over the real reactor, with the real reactor as the client's clock."""

    def setUp(self) -> None:
        super().setUp()
        self.zones: list[tzinfo] = []

    async def service(self, *, learn_zone: bool = True, key: str = KEY,
                      timer: Any = None, url: str = "") -> tuple[
            ZadarmaAccountService, HTTPConnectionPool]:
        pool, http = self.make_pool()
        api = ZadarmaApi(http, real_clock(), key, SECRET, url or await self.start(), PATIENT,
                         100)
        service = ZadarmaAccountService(api, pool, self.clock if timer is None else timer,
                                        ATHENS, learn_zone, self.zones.append)
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service, pool

    def assert_no_timers(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_a_summer_utc_plus_3_is_athens(self) -> None:
        service, _ = await self.service()
        service.startService()
        self.assertEqual(self.fake.requests, [])  # asked from the reactor, not in start
        self.clock.advance(0)
        await until(lambda: self.zones)
        self.assertEqual(self.zones, [ATHENS])
        self.assertIs(self.zones[0], ATHENS)
        self.assertEqual(service.zone_stated, "UTC+3")
        self.assertEqual([(r.path, r.authorized) for r in self.fake.requests],
                         [(TIMEZONE, True)])

    async def test_a_winter_utc_plus_3_is_a_fixed_offset(self) -> None:
        self.clock.advance(WINTER - T0)
        service, _ = await self.service()
        service.startService()
        self.clock.advance(0)
        await until(lambda: self.zones)
        self.assertEqual(self.zones, [timezone(PLUS_3)])

    async def test_on_the_real_reactor_the_zone_is_plus_3_now(self) -> None:
        service, _ = await self.service(timer=reactor)
        service.startService()
        await until(lambda: self.zones)
        await settle()
        self.assertEqual(len(self.zones), 1)
        now = datetime.now(UTC)
        self.assertEqual(now.astimezone(self.zones[0]).utcoffset(), PLUS_3)
        self.assertIn(self.zones[0], (ATHENS, timezone(PLUS_3)))
        # The refresh waits on the real reactor: stopping must cancel it (trial would
        # report a pending call otherwise).
        await service.stopService()

    async def test_it_refreshes_every_refresh_seconds(self) -> None:
        service, _ = await self.service()
        service.startService()
        self.clock.advance(0)
        await until(lambda: self.zones)
        [refresh] = self.clock.getDelayedCalls()
        self.assertEqual(refresh.getTime(), T0 + REFRESH_SECONDS)
        self.clock.advance(REFRESH_SECONDS - 1)
        await settle()
        self.assertEqual(len(self.fake.requests), 1)
        self.clock.advance(1)
        await until(lambda: len(self.zones) == 2)
        self.assertEqual(len(self.fake.requests), 2)
        await service.stopService()
        self.assert_no_timers()

    async def test_a_failure_is_retried_after_retry_seconds(self) -> None:
        self.fake.fail_next(Fault.error("Temporarily unavailable"), path=TIMEZONE)
        service, _ = await self.service()
        service.startService()
        self.clock.advance(0)
        await until(lambda: self.clock.getDelayedCalls())
        self.assertEqual(len(self.fake.requests), 1)
        self.assertEqual(self.zones, [])
        self.assertIsNone(service.zone_stated)
        [retry] = self.clock.getDelayedCalls()
        self.assertEqual(retry.getTime(), T0 + RETRY_SECONDS)
        self.clock.advance(RETRY_SECONDS - 0.5)
        await settle()
        self.assertEqual(len(self.fake.requests), 1)
        self.clock.advance(0.5)
        await until(lambda: self.zones)
        self.assertEqual(self.zones, [ATHENS])
        self.assertEqual(len(self.fake.requests), 2)
        [refresh] = self.clock.getDelayedCalls()
        self.assertEqual(refresh.getTime(), T0 + RETRY_SECONDS + REFRESH_SECONDS)

    async def test_stopping_cancels_a_pending_retry(self) -> None:
        self.fake.fail_next(Fault.server_error(), path=TIMEZONE)
        service, _ = await self.service()
        service.startService()
        self.clock.advance(0)
        await until(lambda: self.clock.getDelayedCalls())
        await service.stopService()
        self.assert_no_timers()
        self.clock.advance(RETRY_SECONDS)
        await settle()
        self.assertEqual(len(self.fake.requests), 1)

    async def test_an_answer_after_stop_schedules_nothing(self) -> None:
        self.fake.fail_next(Fault.hang(), path=TIMEZONE)
        service, _ = await self.service()
        service.startService()
        self.clock.advance(0)
        await until(lambda: self.fake.held == 1)
        await service.stopService()
        await self.fake.close()  # the held request's connection drops: the ask fails
        await settle(0.2)
        self.assert_no_timers()
        self.assertEqual(self.zones, [])

    async def test_stopping_closes_the_pools_connections(self) -> None:
        wrapped = WrappingFactory(self.fake.site())
        url, _ = await self.serve(wrapped)
        service, pool = await self.service(url=url)
        service.startService()
        self.clock.advance(0)
        await until(lambda: self.zones)
        # The connection was kept for the next request, on both sides.
        await until(lambda: pool._connections)
        self.assertEqual(len(wrapped.protocols), 1)
        await service.stopService()
        self.assertEqual(pool._connections, {})
        await until(lambda: not wrapped.protocols)  # the server saw the connection close

    async def test_not_learning_asks_nothing(self) -> None:
        service, _ = await self.service(learn_zone=False)
        service.startService()
        self.clock.advance(0)
        await settle()
        self.assertEqual((self.fake.requests, self.zones), ([], []))
        self.assert_no_timers()
        await service.stopService()

    async def test_without_keys_nothing_is_asked(self) -> None:
        service, _ = await self.service(key="")
        service.startService()
        self.clock.advance(0)
        await settle()
        self.assertEqual((self.fake.requests, self.zones), ([], []))
        self.assert_no_timers()


class _FailingClient:
    """An HTTP client whose request fails as a stale pooled connection does."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import fail
        from twisted.python.failure import Failure
        from twisted.web._newclient import RequestNotSent

        return fail(Failure(RequestNotSent()))


class _NanHeaders(Resource):
    """A success whose rate-limit headers are not numbers a clock can use."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"X-RateLimit-Remaining", b"nan")
        request.setHeader(b"X-RateLimit-Reset", b"inf")
        return b'{"status":"success","balance":1}'


class OddTransportTests(ApiTestCase):
    async def test_any_other_transport_failure_is_unreachable(self) -> None:
        api = ZadarmaApi(_FailingClient(), self.clock, KEY, SECRET, "http://127.0.0.1:1",
                         5.0, 10)
        error = await self.fails(api.request(BALANCE), ZadarmaUnreachable)
        self.assertIn("the request to Zadarma failed", error.message)

    async def test_non_finite_rate_headers_are_ignored(self) -> None:
        url, _ = await self.serve(Site(_NanHeaders()))
        reply = await self.api(url).request(BALANCE)
        self.assertEqual((reply.remaining, reply.reset), (None, None))
