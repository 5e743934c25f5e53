"""The live page and the screen pop in a real browser: headless Chromium from Debian's
packages (installed by the test when missing, as root on Debian:
``test.support.system_packages``), driven by Playwright pointed at it (no browser
download).

dpvoip's real web app (routes, logins against the CRM's ``django_session``, the page's
snapshot from a real PostgreSQL) is served on 127.0.0.1 with a stand-in event stream
mounted at ``/voip/events``: a Twisted resource speaking the stream's wire format
exactly (ids, ``event:``, one line of JSON, ``Last-Event-ID``), which the test feeds.
``test_live_page_daemon`` runs the same page against the daemon's own stream.

Playwright's synchronous API runs in a worker thread; the reactor serves meanwhile, and
the thread hands events to the stand-in with ``blockingCallFromThread``. A screenshot of
the page goes to ``test-screenshots/`` (ignored by git).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from dpvoip.click_to_call.logins import Logins, NotSignedIn
from dpvoip.config import DatabaseSettings, PageSettings, Secret
from dpvoip.crm.logins import session_auth_hash
from dpvoip.store.accounts import Accounts
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.live_page import LivePageReads
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.live_page import LivePages
from test.support import system_packages
from test.support.crm import Crm
from test.support.daemon import PATIENCE
from test.support.postgres import postgres
from test.test_crm_logins import session

SECRET_KEY = "crm-secret-key-for-the-browser-tests-0123456789"
PASSWORD = "pbkdf2_sha256$870000$salt$hash-of-the-password="
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-screenshots"
#: The issue's promise: a ringing call is on the page within a second of its event.
WITHIN = 1000  # ms
T = TypeVar("T")
reactor: Any = _reactor  # mypy: the global reactor provides every interface used here

CRM_PAGE = b"""<!doctype html><html><head><meta charset='utf-8'><title>CRM</title>
<script src='/voip/popup.js' defer></script></head>
<body><h1 id='crm'>The CRM's own page</h1></body></html>"""


def chromium() -> str:
    """Debian's chromium, installed first when missing (``Missing`` says how, otherwise)."""
    return system_packages.ensure("chromium", "chromium")


class StandInStream(Resource):
    """``GET /voip/events`` as the wire format says: signed-in users only (the same
    logins), ``id``/``event``/``data`` blocks, the events after ``Last-Event-ID`` replayed,
    ``reload`` when that id is older than what is kept."""

    isLeaf = True

    def __init__(self, logins: Logins, keep: int = 100) -> None:
        super().__init__()
        self._logins = logins
        self._keep = keep
        self._next = 1
        self.kept: list[tuple[int, str, str]] = []
        self.streams: list[IRequest] = []
        self.opened = 0  # streams asked for, refused or not
        self.down = False  # answer 502, as the CRM's proxy does while dpvoip is away

    def render_GET(self, request: IRequest) -> Any:
        self.opened += 1
        if self.down:
            request.setResponseCode(502)
            return b"dpvoip is away"
        defer.ensureDeferred(self._open(request))
        return NOT_DONE_YET

    async def _open(self, request: IRequest) -> None:
        try:
            await self._logins.identify(request)
        except NotSignedIn:
            request.setResponseCode(401)
            request.write(b"not signed in")
            request.finish()
            return
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b": open\n\n")
        last = (request.getHeader(b"Last-Event-ID")
                or (request.args or {}).get(b"last_event_id", [None])[0])
        if last is not None:
            seen = int(last)
            if self.kept and seen < self.kept[0][0] - 1:
                request.write(self._block(self._next, "reload", "{}"))
            for number, kind, data in self.kept:
                if number > seen:
                    request.write(self._block(number, kind, data))
        self.streams.append(request)
        finished: Any = request  # a twisted.web.server.Request
        finished.notifyFinish().addBoth(lambda _: self.streams.remove(request))

    @staticmethod
    def _block(number: int, kind: str, data: str) -> bytes:
        return f"id: {number}\nevent: {kind}\ndata: {data}\n\n".encode()

    def publish(self, kind: str, data: dict[str, Any]) -> int:
        number, self._next = self._next, self._next + 1
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        self.kept = [*self.kept, (number, kind, text)][-self._keep:]
        for request in list(self.streams):
            request.write(self._block(number, kind, text))
        return number

    def close_all(self) -> None:
        for request in list(self.streams):
            request.finish()


@implementer(IResource)
class Front:
    """The stand-in stream at ``/voip/events``, a CRM page at ``/crm/``, dpvoip's app for
    the rest."""

    isLeaf = True

    def __init__(self, app: IResource, stream: StandInStream) -> None:
        self._app = app
        self._stream = stream

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError

    def render(self, request: IRequest) -> Any:
        if request.path == b"/voip/events":
            return self._stream.render(request)
        if request.path == b"/crm/":
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            return CRM_PAGE
        return self._app.render(request)


class TrackingSite(Site):
    """A Site that can close every connection it has (the browser's keep-alives)."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        lost = channel.connectionLost

        def forget(reason: Any) -> None:
            self.channels.discard(channel)
            lost(reason)

        channel.connectionLost = forget
        return channel


def call_event(call_id: str, state: str, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "call_id": call_id, "state": state, "direction": "incoming",
        "number": "+306912345678", "client": {"id": 7, "name": "Papadopoulos <AE>"},
        "extension": None, "outcome": None, "status": "active", "duration": None,
        "at": datetime.now(UTC).isoformat(), "box": "office"}
    event.update(changes)
    return event


class BrowserTestCase(TestCase):
    timeout = 4 * PATIENCE
    language = "en"

    def setUp(self) -> Any:
        self.executable = chromium()
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 2)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        self.user = self.crm.user("anna", is_staff=True, password=PASSWORD,
                                  first_name="Anna")
        self.cookie = "browsersession0123456789abcdef"
        self.crm.query(
            "INSERT INTO django_session (session_key, session_data, expire_date)"
            " VALUES (%s, %s, %s)", (self.cookie, session(
                {"_auth_user_id": str(self.user),
                 "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                 "_auth_user_hash": session_auth_hash(SECRET_KEY, PASSWORD)}, SECRET_KEY),
                datetime.now(UTC) + timedelta(days=1)))
        self.crm.insert("voip_connection", type="pbx", active=True, number="100",
                        callerid="Anna desk", provider="Zadarma", owner_id=self.user)
        logins = Logins(Accounts(self.store, "public"), Secret(SECRET_KEY), Secret(""),
                        "sessionid", reactor)
        self.stream = StandInStream(logins)
        self.settled: int | None = None  # the live feed's watermark, as the page reads it
        live = LivePages(logins, LivePageReads(self.store, "public"), PageSettings(),
                         self.language, ZoneInfo("Europe/Athens"), reactor, "/admin/login/",
                         lambda: self.settled)

        def ready() -> defer.Deferred[Readiness]:
            return defer.succeed(Readiness(True))

        self.site = TrackingSite(Front(WebApp(ready, "test", live_page=live).resource(),
                                       self.stream))
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.addCleanup(self._close)

        async def start() -> None:
            await pool.start()
            await self.store.write(lambda c: prepare(c, standalone=False,
                                                     crm_schema="public"))
            self.crm.query(
                "INSERT INTO dpvoip.box_status (box, host, port, connected, since,"
                " reconnects, lines, bad_lines, open_calls) VALUES ('office',"
                " '192.168.178.1', 1012, true, now(), 0, 0, 0, 0)")

        return defer.Deferred.fromCoroutine(start())

    async def _close_async(self) -> None:
        self.stream.close_all()
        await defer.maybeDeferred(self.port.stopListening)
        for channel in list(self.site.channels):
            channel.transport.abortConnection()
        while self.site.channels:
            await deferLater(reactor, 0.01, lambda: None)

    def _close(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._close_async())

    # -- from the browser's thread ---------------------------------------------------------

    def in_browser(self, work: Callable[[Any], None]) -> defer.Deferred[None]:
        """Run ``work(page)`` in a worker thread with a fresh Chromium page signed in to
        the CRM (its session cookie on this host)."""

        def run() -> None:
            with self.browser() as context:
                work(context)

        return threads.deferToThread(run)

    @contextmanager
    def browser(self) -> Iterator[Any]:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=self.executable, args=["--no-sandbox"])
            try:
                context = browser.new_context(locale="en-GB")
                context.add_cookies([{"name": "sessionid", "value": self.cookie,
                                      "url": self.base}])
                yield context
            finally:
                browser.close()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        blockingCallFromThread(reactor, self.stream.publish, kind, data)

    def on_reactor(self, work: Callable[[], T]) -> T:
        result: T = blockingCallFromThread(reactor, lambda: defer.succeed(work()))  # type: ignore[arg-type]
        return result

    def wait_no_streams(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while self.on_reactor(lambda: len(self.stream.streams)) > 0:
            if time.monotonic() > deadline:
                raise AssertionError("a closed page's stream stayed open")
            time.sleep(0.02)

    def wait_streams(self, count: int) -> None:
        deadline = time.monotonic() + PATIENCE
        while self.on_reactor(lambda: len(self.stream.streams)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never opened {count} stream(s)")
            time.sleep(0.02)


def screenshot(page: Any, name: str) -> None:
    """The whole page as a PNG in the git-ignored ``test-screenshots/``."""
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


class LivePageBrowserTests(BrowserTestCase):
    @defer.inlineCallbacks
    def test_the_page_follows_a_call_from_ringing_to_its_ticket(self) -> Any:
        def work(context: Any) -> None:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(self.base + "/voip/")
            self.assertEqual(page.title(), "Calls, live")
            self.assertEqual(page.inner_text("[data-empty-for='in-progress']"),
                             "No call in progress.")
            self.assertIn("connected", page.inner_text("#boxes li[data-box='office']"))
            page.wait_for_selector("body[data-stream='live']", timeout=PATIENCE * 1000)

            self.publish("call", call_event("fb-1", "ringing"))
            row = page.wait_for_selector("#in-progress tr[data-call='fb-1']", timeout=WITHIN)
            assert row is not None
            self.assertIn("ringing", row.inner_text())
            link = page.locator("#in-progress tr[data-call='fb-1'] .c-client a")
            self.assertEqual(link.inner_text(), "Papadopoulos <AE>", "text, never markup")
            self.assertEqual(link.get_attribute("href"), "/accounting/client/7/")
            self.assertTrue(page.is_hidden("[data-empty-for='in-progress']"))

            self.publish("call", call_event("fb-1", "answered", extension="12"))
            page.wait_for_function(
                "() => document.querySelector(\"#in-progress tr[data-call='fb-1'] .c-state\")"
                ".textContent === 'in conversation'", timeout=PATIENCE * 1000)
            screenshot(page, "live-page-answered.png")

            self.publish("call", call_event("fb-1", "ended", outcome="missed",
                                            status="missed", duration=0))
            self.publish("ticket", {"ticket_id": 41, "call_id": "fb-1",
                                    "number": "+306912345678",
                                    "client": {"id": 7, "name": "Papadopoulos <AE>"},
                                    "count": 1, "action": "created"})
            page.wait_for_selector("#recent tr[data-call='fb-1'].outcome-missed",
                                   timeout=PATIENCE * 1000)
            page.wait_for_selector("#tickets tr[data-ticket='41']", timeout=PATIENCE * 1000)
            self.assertEqual(page.locator("#in-progress tr").count(), 0)
            self.assertTrue(page.is_visible("[data-empty-for='in-progress']"))
            self.assertEqual(page.inner_text("#recent tr[data-call='fb-1'] .c-outcome"),
                             "missed")
            self.publish("ticket", {"ticket_id": 41, "call_id": "fb-2",
                                    "number": "+306912345678", "client": None,
                                    "count": 2, "action": "grouped"})
            page.wait_for_function(
                "() => document.querySelector(\"#tickets tr[data-ticket='41'] .t-count\")"
                ".textContent === '2'", timeout=PATIENCE * 1000)
            self.assertEqual(page.locator("#tickets tr").count(), 1, "grouped, not added")
            self.assertEqual(page.inner_text("#tickets tr[data-ticket='41'] .c-client"),
                             "Papadopoulos <AE>", "a call without a client keeps the ticket's")

            self.publish("box", {"box": "office", "connected": False,
                                 "since": datetime.now(UTC).isoformat()})
            page.wait_for_selector("#boxes li[data-box='office'].disconnected",
                                   timeout=PATIENCE * 1000)
            screenshot(page, "live-page.png")
            self.assertEqual(errors, [])

        yield self.in_browser(work)
        self.assertTrue((SCREENSHOTS / "live-page.png").stat().st_size > 1000)

    @defer.inlineCallbacks
    def test_a_call_that_rang_while_the_page_loaded_is_on_it(self) -> Any:
        """The page's snapshot was read before the call's event committed, its stream
        opened after: the stream starts after the events the page was rendered with, so
        the call is on the page at once, not at its next event."""
        [(newest,)] = self.crm.query("SELECT max(id) FROM dpvoip.live_event")
        self.settled = newest  # every event to here is in the snapshot
        self.stream._next = newest + 1
        self.stream.publish("call", call_event("fb-7", "ringing"))  # no stream open yet

        def work(context: Any) -> None:
            page = context.new_page()
            page.goto(self.base + "/voip/")
            self.assertEqual(page.get_attribute("body", "data-last-event-id"), str(newest))
            page.wait_for_selector("#in-progress tr[data-call='fb-7']",
                                   timeout=PATIENCE * 1000)
            self.assertEqual(page.locator("#in-progress tr").count(), 1)

        yield self.in_browser(work)

    @defer.inlineCallbacks
    def test_a_reconnect_misses_nothing_and_an_old_one_reloads(self) -> Any:
        def work(context: Any) -> None:
            page = context.new_page()
            page.goto(self.base + "/voip/")
            page.wait_for_selector("body[data-stream='live']", timeout=PATIENCE * 1000)
            self.publish("call", call_event("fb-1", "ringing"))
            page.wait_for_selector("#in-progress tr[data-call='fb-1']",
                                   timeout=PATIENCE * 1000)
            # The stream drops (a proxy's idle cut, dpvoip restarting): the browser comes
            # back by itself with Last-Event-ID and gets what it missed meanwhile.
            self.on_reactor(self.stream.close_all)
            self.publish("call", call_event("fb-2", "ringing", number="+302101234567",
                                            client=None))
            page.wait_for_selector("#in-progress tr[data-call='fb-2']",
                                   timeout=PATIENCE * 1000)
            self.assertEqual(page.locator("#in-progress tr").count(), 2)
            # Far behind the kept window: the stream says reload, the page does.
            page.evaluate("window.dpvoipMarker = 1")
            self.on_reactor(lambda: setattr(self.stream, "_keep", 1))
            self.on_reactor(self.stream.close_all)
            for n in range(3):
                self.publish("box", {"box": f"b{n}", "connected": True, "since": None})
            page.wait_for_function("() => window.dpvoipMarker === undefined",
                                   timeout=PATIENCE * 1000)

        yield self.in_browser(work)

    @defer.inlineCallbacks
    def test_a_stranger_is_shown_the_sign_in_page(self) -> Any:
        def work(context: Any) -> None:
            context.clear_cookies()
            page = context.new_page()
            answer = page.goto(self.base + "/voip/")
            self.assertEqual(answer.status, 401)
            self.assertIn("Sign in", page.inner_text("body"))
            self.assertEqual(page.locator("#in-progress").count(), 0)

        yield self.in_browser(work)


class GreekLivePageBrowserTests(BrowserTestCase):
    language = "el"

    @defer.inlineCallbacks
    def test_the_page_in_greek(self) -> Any:
        def work(context: Any) -> None:
            page = context.new_page()
            page.goto(self.base + "/voip/")
            page.wait_for_selector("body[data-stream='live']", timeout=PATIENCE * 1000)
            self.assertEqual(page.inner_text("#stream-state"), "ζωντανά")
            self.publish("call", call_event("fb-1", "ended", outcome="not reached",
                                            direction="outgoing", status="failed",
                                            duration=65))
            row = page.wait_for_selector("#recent tr[data-call='fb-1']",
                                         timeout=PATIENCE * 1000)
            assert row is not None
            self.assertIn("δεν απάντησε", row.inner_text())
            self.assertIn("εξερχόμενη", row.inner_text())
            self.assertIn("1:05", row.inner_text())
            screenshot(page, "live-page-greek.png")

        yield self.in_browser(work)


class ScreenPopBrowserTests(BrowserTestCase):
    #: Records the desktop notifications the script makes (permission granted).
    NOTIFICATIONS = """
        window.shownNotifications = [];
        window.Notification = function (title, options) {
            window.shownNotifications.push([title, options.body]);
        };
        window.Notification.permission = 'granted';
        window.Notification.requestPermission = function () {
            return Promise.resolve('granted'); };
    """

    @defer.inlineCallbacks
    def test_a_ringing_call_pops_up_on_a_crm_page(self) -> Any:
        def work(context: Any) -> None:
            context.add_init_script(self.NOTIFICATIONS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(self.base + "/crm/")
            self.wait_streams(1)
            # Staff, "mine": a call on another desk's extension does not pop up here.
            self.publish("call", call_event("zd-9", "ringing", extension="55"))
            self.publish("call", call_event("fb-1", "ringing"))
            popup = page.wait_for_selector(".dpvoip-popup[data-dpvoip-call='fb-1']",
                                           timeout=WITHIN)
            assert popup is not None
            text = popup.inner_text()
            self.assertIn("Incoming call", text)
            self.assertIn("Papadopoulos <AE>", text)
            self.assertIn("+306912345678", text)
            link = page.locator(".dpvoip-popup[data-dpvoip-call='fb-1'] a.dpvoip-client")
            self.assertEqual(link.get_attribute("href"),
                             self.base + "/accounting/client/7/")
            self.assertEqual(page.locator(".dpvoip-popup").count(), 1)
            self.assertEqual(page.evaluate("window.shownNotifications"),
                             [["Incoming call: Papadopoulos <AE>", "+306912345678"]])
            screenshot(page, "screen-pop.png")
            self.publish("call", call_event("fb-2", "ringing", extension="100",
                                            client=None, number=""))
            page.wait_for_selector(".dpvoip-popup[data-dpvoip-call='fb-2']",
                                   timeout=PATIENCE * 1000)
            self.assertIn("withheld number",
                          page.inner_text(".dpvoip-popup[data-dpvoip-call='fb-2']"))
            self.publish("call", call_event("fb-1", "answered", extension="12"))
            page.wait_for_selector(".dpvoip-popup[data-dpvoip-call='fb-1']",
                                   state="detached", timeout=PATIENCE * 1000)
            self.assertEqual(page.inner_text("#crm"), "The CRM's own page")
            self.assertEqual(errors, [])

        yield self.in_browser(work)

    @defer.inlineCallbacks
    def test_a_call_ringing_when_a_crm_page_opens_pops_up(self) -> Any:
        """The CRM's pages come and go (each one's script starts anew): a call that began
        ringing before this page opened pops up at once, and so does one whose event
        came while it loaded (before its stream was open)."""
        self.crm.query(
            "INSERT INTO accounting_voipcall (call_id, direction, phone_number, status,"
            " started_at, duration_seconds, notes, ticket_created, created_at, updated_at,"
            " resolution) VALUES ('fb-3', 'incoming', '+302101112223', 'active', now(), 0,"
            " '', false, now(), now(), 'pending')")
        [(newest,)] = self.crm.query("SELECT max(id) FROM dpvoip.live_event")
        self.settled = newest
        self.stream._next = newest + 1
        self.stream.publish("call", call_event("fb-4", "ringing"))  # no stream open yet

        def work(context: Any) -> None:
            page = context.new_page()
            page.goto(self.base + "/crm/")
            popup = page.wait_for_selector(".dpvoip-popup[data-dpvoip-call='fb-3']",
                                           timeout=PATIENCE * 1000)
            assert popup is not None
            self.assertIn("+302101112223", popup.inner_text())
            page.wait_for_selector(".dpvoip-popup[data-dpvoip-call='fb-4']",
                                   timeout=PATIENCE * 1000)
            self.assertEqual(page.locator(".dpvoip-popup").count(), 2)
            # Without an id to resume after (the feed has settled nothing yet), a call
            # ringing as the page opens is not shown: its end might never reach it.
            self.settled = None
            page.close()  # the next page holds the stream itself, once its settings are in
            self.wait_no_streams()
            other = context.new_page()
            other.goto(self.base + "/crm/")
            self.wait_streams(1)
            self.publish("call", call_event("fb-5", "ringing"))
            other.wait_for_selector(".dpvoip-popup[data-dpvoip-call='fb-5']",
                                    timeout=PATIENCE * 1000)
            self.assertEqual(other.locator(".dpvoip-popup[data-dpvoip-call='fb-3']").count(),
                             0)

        yield self.in_browser(work)

    @defer.inlineCallbacks
    def test_with_dpvoip_away_the_crm_page_is_left_alone(self) -> Any:
        self.stream.down = True

        def work(context: Any) -> None:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.clock.install()
            page.goto(self.base + "/crm/")
            page.wait_for_function("() => document.readyState === 'complete'")
            for _ in range(60):  # a minute, a second at a time
                page.clock.run_for(1000)
                page.evaluate("1")
            attempts = self.on_reactor(lambda: self.stream.opened)
            # 2 s, 4 s, 8 s, 16 s, 32 s (each +-25 %): five or six in a minute. The
            # browser's own retries (every 3 s) would be twenty.
            self.assertGreaterEqual(attempts, 3)
            self.assertLessEqual(attempts, 7)
            self.assertEqual(page.locator(".dpvoip-popup").count(), 0)
            self.assertEqual(page.inner_text("#crm"), "The CRM's own page")
            self.assertEqual(errors, [])

        yield self.in_browser(work)

    @defer.inlineCallbacks
    def test_nobody_signed_in_no_stream_no_error(self) -> Any:
        def work(context: Any) -> None:
            context.clear_cookies()
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.clock.install()
            with page.expect_response(lambda r: r.url.endswith("/voip/popup.json")) as asked:
                page.goto(self.base + "/crm/")
            self.assertEqual(asked.value.status, 401)
            page.clock.run_for(600_000)  # ten minutes: it never asks again
            page.evaluate("1")
            self.assertEqual(self.on_reactor(lambda: self.stream.opened), 0)
            self.assertEqual(errors, [])

        yield self.in_browser(work)
