"""The live page and the screen pop in headless Chromium, against the real daemon.

``test_browser_live`` runs the page against a stand-in stream; here everything is real:
the installed daemon (``twistd dpvoip``, as administrators run it) attached to a CRM
database of the suite's PostgreSQL, a Fritz!Box played by dpvoip's own simulator
(``dpvoip/testing/fritzbox.py``, the one ``dpvoip fritz-sim`` runs) on loopback, Zadarma's
webhooks signed with the account's secret (``dpvoip/testing/zadarma_caller.py``), a CRM
user signed in with the CRM's session cookie, and Chromium from Debian's packages driven
by Playwright (the helpers of ``test_browser_live``).

The browser reaches the daemon through a port forwarder of the test's own, as it reaches
it through the CRM's reverse proxy in an office: the test can cut the browser's
connections there and hold new ones off (the stream dropped by a proxy, dpvoip away for a
moment), and it sees the ``Last-Event-ID`` of the browser's reconnection. The CRM's page
that includes ``popup.js`` is answered by Playwright on the daemon's own origin (the
proxy's, as in an office where the CRM and ``/voip/`` share a host).

One wall-clock bound, the issue's: a ringing call is in the page's DOM within a second of
the box sending its RING line (or of Zadarma's NOTIFY_START being posted), measured from
the send (the test's clock) to the row's insertion (a MutationObserver in the page,
stamped with ``performance.timeOrigin + performance.now()``; both clocks are this
machine's wall clock). Every other wait is a generous bound on something that must
happen.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import treq
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.crm.logins import session_auth_hash
from dpvoip.testing.fritzbox import FritzSimulator
from dpvoip.testing.fritzbox import parse_script as box_script
from dpvoip.testing.zadarma_caller import Delivery, Webhook, ZadarmaCaller, plan
from dpvoip.testing.zadarma_caller import parse_script as zadarma_script
from test.support.crm import Crm
from test.support.daemon import PATIENCE, Daemon, clean_environment, twistd
from test.support.postgres import postgres, query
from test.test_browser_live import (
    PASSWORD,
    SCREENSHOTS,
    SECRET_KEY,
    WITHIN,
    chromium,
    screenshot,
)
from test.test_crm_logins import session

ZADARMA_SECRET = "live-browser-zadarma-secret"
ZONE = ZoneInfo("Europe/Athens")
OFFICE = "2107654321"
#: The clients the calls come from; their names need escaping.
FRITZ_CALLER, FRITZ_NAME = "6912345678", "Papadopoulos <AE>"
ZADARMA_CALLER, ZADARMA_NAME = "6987654321", "Ioannou & Sons"
#: A Zadarma call that rings and is not answered.
ZADARMA_MISSED = (f"NOTIFY_START caller_id={ZADARMA_CALLER} called_did=30{OFFICE}",
                  'NOTIFY_END duration=0 disposition="no answer" status_code=19'
                  " is_recorded=0")
T = TypeVar("T")
reactor: Any = _reactor  # mypy: the global reactor provides every interface used here

CRM_PAGE = """<!doctype html><html><head><meta charset='utf-8'><title>CRM</title>
<script src='/voip/popup.js' defer></script></head>
<body><h1 id='crm'>The CRM's own page</h1></body></html>"""

#: Stamps, in the page, when a row with a number first appears in a table: the browser's
#: side of the one-second measure.
OBSERVE = """() => {
    window.dpvoipSeen = {};
    const note = () => {
        for (const row of document.querySelectorAll('#in-progress tr, #recent tr')) {
            const cell = row.querySelector('.c-number');
            const key = row.closest('tbody').id + ' ' + (cell ? cell.textContent : '');
            if (!(key in window.dpvoipSeen)) {
                window.dpvoipSeen[key] = performance.timeOrigin + performance.now();
            }
        }
    };
    note();
    for (const id of ['in-progress', 'recent']) {
        new MutationObserver(note).observe(document.getElementById(id),
                                           {childList: true, subtree: true});
    }
}"""

#: Records the desktop notifications popup.js makes (permission granted).
NOTIFICATIONS = """
    window.shownNotifications = [];
    window.Notification = function (title, options) {
        window.shownNotifications.push([title, options.body]);
    };
    window.Notification.permission = 'granted';
    window.Notification.requestPermission = function () {
        return Promise.resolve('granted'); };
"""


def e164(national: str) -> str:
    return "+30" + national


def row(table: str, number: str) -> str:
    """The selector of the row of ``number`` in the page's table ``table``."""
    return f"#{table} tr:has(.c-number:text-is('{e164(number)}'))"


class Forwarder(ProxyServer):
    """One browser connection forwarded to the daemon; it notes the request headers."""

    factory: CuttableProxy

    def connectionMade(self) -> None:
        if self.factory.blocked:
            transport: Any = self.transport  # a TCP connection
            transport.abortConnection()
            self.factory.refused += 1
            return
        self.factory.open.add(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.factory.requests.append(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class CuttableProxy(ProxyFactory):
    """The CRM's reverse proxy as far as the browser can tell: it forwards, and the test
    can cut every connection (``cut``) and refuse new ones for a while (``blocked``)."""

    protocol = Forwarder
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.open: set[Forwarder] = set()
        self.requests: list[bytes] = []
        self.blocked = False
        self.refused = 0

    def cut(self) -> None:
        for forwarder in list(self.open):
            transport: Any = forwarder.transport  # a TCP connection
            transport.abortConnection()

    def last_event_ids(self) -> list[int]:
        """The ``Last-Event-ID`` of every stream the browser asked for."""
        found = []
        for data in self.requests:
            head = data.split(b"\r\n\r\n", 1)[0]
            if not head.startswith(b"GET /voip/events"):
                continue
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"last-event-id":
                    found.append(int(value.strip()))
        return found


class DaemonBrowserTestCase(TestCase):
    timeout = 6 * PATIENCE

    def setUp(self) -> Any:
        return self._set_up()

    @defer.inlineCallbacks
    def _set_up(self) -> Any:
        self.executable = chromium()
        self.home = Path(tempfile.mkdtemp(prefix="dpvoip-live-browser-"))
        self.home.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.home, True)
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        self.user = self.crm.user("anna", is_staff=True, password=PASSWORD,
                                  first_name="Anna")
        self.cookie = "daemonbrowsersession0123456789"
        self.crm.query(
            "INSERT INTO django_session (session_key, session_data, expire_date)"
            " VALUES (%s, %s, %s)", (self.cookie, session(
                {"_auth_user_id": str(self.user),
                 "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                 "_auth_user_hash": session_auth_hash(SECRET_KEY, PASSWORD)}, SECRET_KEY),
                datetime.now(UTC) + timedelta(days=1)))
        self.crm.insert("voip_connection", type="pbx", active=True, number="100",
                        callerid="Anna desk", provider="Zadarma", owner_id=self.user)
        self.fritz_client = self.crm.client(FRITZ_NAME, kinito_tilefono=FRITZ_CALLER)
        self.zadarma_client = self.crm.client(ZADARMA_NAME, kinito_tilefono=ZADARMA_CALLER)

        self.box = FritzSimulator(reactor, box_script("0 !await\n"), host="127.0.0.1")
        box_port = yield self.box.listen(0)
        self.addCleanup(self.box.stop)
        config = self.home / "dpvoip.toml"
        config.write_text(
            f'[daemon]\nstate_dir = "{self.home / "state"}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'[zadarma]\nsecret = "{ZADARMA_SECRET}"\ntimezone = "Europe/Athens"\n'
            'allowed_networks = ["127.0.0.1/32"]\ncreate_tickets = true\n'
            f'[directory]\nown_numbers = ["{OFFICE}"]\n'
            f'[[fritzbox]]\nname = "office"\nhost = "127.0.0.1"\nport = {box_port}\n'
            'reconnect_initial_seconds = 0.1\nreconnect_max_seconds = 1.0\n')
        self.daemon = Daemon(twistd("-n", "--pidfile=", "dpvoip", "--config", str(config)),
                             self.home, clean_environment(DATABASE_URL=self.dsn,
                                                          SECRET_KEY=SECRET_KEY))
        self.addCleanup(self._stop_daemon)
        url = yield threads.deferToThread(self.daemon.wait_listening)
        yield threads.deferToThread(self.daemon.wait_ready)
        yield self._until(lambda: self.box.connected > 0, "the daemon never connected to "
                                                          "the box")
        daemon_port = int(url.rsplit(":", 1)[1])
        self.proxy = CuttableProxy("127.0.0.1", daemon_port)
        listening = reactor.listenTCP(0, self.proxy, interface="127.0.0.1")
        self.addCleanup(self._stop_proxy, listening)
        self.base = f"http://127.0.0.1:{listening.getHost().port}"
        self.zadarma_pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.zadarma_pool.closeCachedConnections)
        self.zadarma = ZadarmaCaller(url + "/voip/zd/", ZADARMA_SECRET, treq,
                                     lambda seconds: deferLater(reactor, 0),
                                     pool=self.zadarma_pool)

    def _stop_daemon(self) -> defer.Deferred[None]:
        def stop() -> None:
            code = self.daemon.terminate()
            self.daemon.kill()
            self.assertEqual(code, 0, self.daemon.output())

        return threads.deferToThread(stop)

    @defer.inlineCallbacks
    def _stop_proxy(self, listening: Any) -> Any:
        yield listening.stopListening()
        self.proxy.cut()
        yield self._until(lambda: not self.proxy.open, "the proxy's connections linger")

    @defer.inlineCallbacks
    def _until(self, done: Callable[[], bool], why: str) -> Any:
        deadline = time.monotonic() + PATIENCE
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(why)
            yield deferLater(reactor, 0.02, lambda: None)

    # -- the far side, from the browser's thread ---------------------------------------

    def on_reactor(self, work: Callable[[], T]) -> T:
        result: T = blockingCallFromThread(reactor, lambda: defer.succeed(work()))  # type: ignore[arg-type]
        return result

    def box_line(self, line: str, ahead: int = 0) -> float:
        """The box sends ``line`` (its date prepended, ``ahead`` seconds in the future);
        when it went out (time.time())."""
        when = "{now}" if not ahead else f"{{now+{ahead}}}"

        def send() -> float:
            self.box.script = box_script(f"0 {when};{line}\n")
            self.box.run()  # connected, no delay: the line is written before this returns
            return time.time()

        return self.on_reactor(send)

    def zadarma_call(self, *events: str) -> list[Webhook]:
        """One Zadarma call of ``events`` (zadarma-call script lines without delay and
        call name), planned as Zadarma would post them, starting now."""
        text = "".join(f"0 call {event}\n" for event in events)
        return list(plan(zadarma_script(text), time.time(), ZONE))

    def post(self, webhook: Webhook) -> float:
        """Zadarma posts ``webhook``; when it was sent. Fails unless dpvoip took it."""
        sent = time.time()
        delivery: Delivery = blockingCallFromThread(
            reactor, lambda: defer.Deferred.fromCoroutine(  # type: ignore[arg-type]
                self.zadarma.send(webhook)))
        self.assertEqual(delivery.status, 200, delivery.body)
        return sent

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return query(self.dsn, sql)

    def in_browser(self, work: Callable[[Any], None]) -> defer.Deferred[None]:
        """``work(context)`` in a worker thread, with Chromium signed in to the CRM."""

        def run() -> None:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=self.executable, args=["--no-sandbox"])
                try:
                    context = browser.new_context(locale="en-GB")
                    context.add_cookies([{"name": "sessionid", "value": self.cookie,
                                          "url": self.base}])
                    context.route(self.base + "/crm/", lambda route: route.fulfill(
                        status=200, content_type="text/html; charset=utf-8",
                        body=CRM_PAGE))
                    work(context)
                finally:
                    browser.close()

        return threads.deferToThread(run)

    def streams_open(self) -> int:
        """The daemon's event streams open now (its /metrics)."""
        with_metrics = self.daemon.url + "/metrics"
        import urllib.request

        with urllib.request.urlopen(with_metrics, timeout=PATIENCE) as answer:  # noqa: S310
            for line in answer.read().decode().splitlines():
                if line.startswith("dpvoip_live_streams_open "):
                    return int(float(line.split()[1]))
        raise AssertionError("no dpvoip_live_streams_open in /metrics")

    def wait_streams(self, count: int) -> None:
        deadline = time.monotonic() + PATIENCE
        while self.streams_open() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the browser never opened {count} stream(s)")
            time.sleep(0.05)

    def assert_within_a_second(self, page: Any, key: str, sent: float, what: str) -> None:
        seen = page.evaluate(f"window.dpvoipSeen[{key!r}]")
        self.assertIsNotNone(seen, f"{what}: the row was never noted")
        late = seen - sent * 1000
        print(f"\n{what}: in the page {late:.0f} ms after it was sent")
        self.assertLessEqual(late, WITHIN, f"{what}: {late:.0f} ms")


class LivePageDaemonTests(DaemonBrowserTestCase):
    @defer.inlineCallbacks
    def test_box_and_zadarma_calls_ring_end_and_open_tickets_on_the_page(self) -> Any:
        def work(context: Any) -> None:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(self.base + "/voip/")
            self.assertEqual(page.title(), "Calls, live")
            page.wait_for_selector("#boxes li[data-box='office'].connected",
                                   timeout=PATIENCE * 1000)
            page.wait_for_selector("body[data-stream='live']", timeout=PATIENCE * 1000)
            self.wait_streams(1)
            page.evaluate(OBSERVE)

            # 1. The box: RING, on the page within a second; DISCONNECT: a missed call
            # and its ticket.
            sent = self.box_line(f"RING;0;{FRITZ_CALLER};{OFFICE};SIP0;")
            ringing = page.wait_for_selector(row("in-progress", FRITZ_CALLER),
                                             timeout=PATIENCE * 1000)
            assert ringing is not None
            self.assert_within_a_second(page, f"in-progress {e164(FRITZ_CALLER)}", sent,
                                        "the box's RING")
            self.assertIn("ringing", ringing.inner_text())
            link = page.locator(row("in-progress", FRITZ_CALLER) + " .c-client a")
            self.assertEqual(link.inner_text(), FRITZ_NAME, "text, never markup")
            self.assertEqual(link.get_attribute("href"),
                             f"/accounting/client/{self.fritz_client}/")
            self.box_line("DISCONNECT;0;0;", ahead=5)  # rang 5 s: missed, not blocked
            ended = page.wait_for_selector(row("recent", FRITZ_CALLER),
                                           timeout=PATIENCE * 1000)
            assert ended is not None
            self.assertIn("outcome-missed", ended.get_attribute("class") or "")
            self.assertEqual(page.inner_text(row("recent", FRITZ_CALLER) + " .c-outcome"),
                             "missed")
            self.assertEqual(page.locator(row("in-progress", FRITZ_CALLER)).count(), 0)
            ticket = page.wait_for_selector(
                f"#tickets tr:has(.t-number:text-is('{e164(FRITZ_CALLER)}'))",
                timeout=PATIENCE * 1000)
            assert ticket is not None
            self.assertIn(FRITZ_NAME, ticket.inner_text())
            self.assertEqual(ticket.query_selector(".t-count").inner_text(), "1")
            stored = self.rows("SELECT ticket_id FROM accounting_voipcall"
                               f" WHERE phone_number = '{e164(FRITZ_CALLER)}'")
            self.assertEqual(ticket.get_attribute("data-ticket"), str(stored[0][0]))

            # 2. Zadarma: NOTIFY_START the same way, NOTIFY_END a missed call, a ticket.
            start, end = self.zadarma_call(*ZADARMA_MISSED)
            sent = self.post(start)
            ringing = page.wait_for_selector(row("in-progress", ZADARMA_CALLER),
                                             timeout=PATIENCE * 1000)
            assert ringing is not None
            self.assert_within_a_second(page, f"in-progress {e164(ZADARMA_CALLER)}", sent,
                                        "Zadarma's NOTIFY_START")
            self.assertIn("ringing", ringing.inner_text())
            self.assertEqual(
                page.inner_text(row("in-progress", ZADARMA_CALLER) + " .c-client a"),
                ZADARMA_NAME)
            self.assertEqual(page.inner_text(row("in-progress", ZADARMA_CALLER)
                                             + " .c-box"), "zadarma")
            screenshot(page, "live-page-daemon-ringing.png")
            self.post(end)
            page.wait_for_selector(row("recent", ZADARMA_CALLER) + ".outcome-missed",
                                   timeout=PATIENCE * 1000)
            page.wait_for_selector(
                f"#tickets tr:has(.t-number:text-is('{e164(ZADARMA_CALLER)}'))",
                timeout=PATIENCE * 1000)
            self.assertEqual(page.locator("#in-progress tr").count(), 0)
            self.assertTrue(page.is_visible("[data-empty-for='in-progress']"))
            self.assertEqual(page.locator("#tickets tr").count(), 2)
            screenshot(page, "live-page-daemon.png")
            self.assertEqual(errors, [])

        yield self.in_browser(work)
        self.assertGreater((SCREENSHOTS / "live-page-daemon.png").stat().st_size, 1000)

    @defer.inlineCallbacks
    def test_a_reconnect_with_last_event_id_misses_nothing(self) -> Any:
        def work(context: Any) -> None:
            page = context.new_page()
            page.goto(self.base + "/voip/")
            page.wait_for_selector("body[data-stream='live']", timeout=PATIENCE * 1000)
            self.wait_streams(1)
            self.box_line(f"RING;0;{FRITZ_CALLER};{OFFICE};SIP0;")
            page.wait_for_selector(row("in-progress", FRITZ_CALLER),
                                   timeout=PATIENCE * 1000)
            page.evaluate("window.dpvoipMarker = 1")  # gone if the page reloads
            # The proxy drops the stream and refuses the browser for a while.
            self.on_reactor(lambda: setattr(self.proxy, "blocked", True))
            self.on_reactor(self.proxy.cut)
            page.wait_for_selector("body[data-stream='reconnecting']",
                                   timeout=PATIENCE * 1000)
            # Meanwhile: the box's call is answered; another rings and is missed (a
            # ticket); a Zadarma call rings and is still ringing.
            self.box_line("CONNECT;0;10;" + FRITZ_CALLER + ";")
            self.box_line(f"RING;1;2101234567;{OFFICE};SIP0;")
            self.box_line("DISCONNECT;1;0;", ahead=5)
            start, _ = self.zadarma_call(*ZADARMA_MISSED)
            self.post(start)
            deadline = time.monotonic() + PATIENCE
            while not self.rows("SELECT 1 FROM accounting_ticket"):  # all committed
                if time.monotonic() > deadline:
                    raise AssertionError("the missed call never made a ticket")
                time.sleep(0.05)
            self.assertEqual(self.streams_open(), 0, "the browser is away")
            # It tries again by itself (after the stream's retry: 3 s) and is refused: a
            # failed reconnection must not end its EventSource.
            while self.on_reactor(lambda: self.proxy.refused) == 0:
                if time.monotonic() > deadline:
                    raise AssertionError("the browser never tried to reconnect")
                time.sleep(0.05)
            refused = self.on_reactor(lambda: self.proxy.refused)
            self.on_reactor(lambda: setattr(self.proxy, "blocked", False))

            page.wait_for_selector(row("in-progress", ZADARMA_CALLER),
                                   timeout=PATIENCE * 1000)
            page.wait_for_selector(row("in-progress", FRITZ_CALLER)
                                   + " .c-state:text-is('in conversation')",
                                   timeout=PATIENCE * 1000)
            page.wait_for_selector(row("recent", "2101234567") + ".outcome-missed",
                                   timeout=PATIENCE * 1000)
            page.wait_for_selector("#tickets tr:has(.t-number:text-is('+302101234567'))",
                                   timeout=PATIENCE * 1000)
            self.assertEqual(page.evaluate("window.dpvoipMarker"), 1,
                             "caught up by the stream, not by reloading the page")
            self.assertEqual(page.locator("#in-progress tr").count(), 2)
            self.assertEqual(page.inner_text("body").count(ZADARMA_NAME), 1)
            asked = self.on_reactor(self.proxy.last_event_ids)
            newest = self.rows("SELECT max(id) FROM dpvoip.live_event")[0][0]
            print(f"\nreconnect: Last-Event-ID sent {asked}, {refused} connection(s)"
                  f" refused meanwhile, newest event {newest}")
            self.assertTrue(asked, "the browser came back with Last-Event-ID")
            self.assertLess(asked[-1], newest, "and it was behind")
            screenshot(page, "live-page-daemon-reconnected.png")

        yield self.in_browser(work)


class ScreenPopDaemonTests(DaemonBrowserTestCase):
    @defer.inlineCallbacks
    def test_a_ringing_call_pops_up_on_a_crm_page(self) -> Any:
        def work(context: Any) -> None:
            context.add_init_script(NOTIFICATIONS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(self.base + "/crm/")
            self.wait_streams(1)

            self.box_line(f"RING;0;{FRITZ_CALLER};{OFFICE};SIP0;")
            popup = page.wait_for_selector(".dpvoip-popup", timeout=PATIENCE * 1000)
            assert popup is not None
            text = popup.inner_text()
            self.assertIn("Incoming call", text)
            self.assertIn(FRITZ_NAME, text)
            self.assertIn(e164(FRITZ_CALLER), text)
            link = page.locator(".dpvoip-popup a.dpvoip-client")
            self.assertEqual(link.get_attribute("href"),
                             f"{self.base}/accounting/client/{self.fritz_client}/")
            self.assertEqual(page.evaluate("window.shownNotifications"),
                             [[f"Incoming call: {FRITZ_NAME}", e164(FRITZ_CALLER)]])
            screenshot(page, "screen-pop-daemon.png")
            self.box_line("CONNECT;0;10;" + FRITZ_CALLER + ";")
            page.wait_for_selector(".dpvoip-popup", state="detached",
                                   timeout=PATIENCE * 1000)

            start, end = self.zadarma_call(*ZADARMA_MISSED)
            self.post(start)
            popup = page.wait_for_selector(".dpvoip-popup", timeout=PATIENCE * 1000)
            assert popup is not None
            self.assertIn(ZADARMA_NAME, popup.inner_text())
            self.assertEqual(page.locator(".dpvoip-popup a.dpvoip-client")
                             .get_attribute("href"),
                             f"{self.base}/accounting/client/{self.zadarma_client}/")
            self.post(end)
            page.wait_for_selector(".dpvoip-popup", state="detached",
                                   timeout=PATIENCE * 1000)
            self.assertEqual(page.inner_text("#crm"), "The CRM's own page")
            self.assertEqual(errors, [])

        yield self.in_browser(work)
