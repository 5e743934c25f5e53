"""The live page as HTML: what it renders (every value escaped, in English and Greek), the
headers it is sent with (a strict Content-Security-Policy), who may open it, the files it
loads and the screen pop's settings. In memory: the real routes and logins over a fake of
the page's reads (``test_live_page_sql`` runs the real reads on PostgreSQL)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from dpvoip.click_to_call.logins import Logins
from dpvoip.config import ConfigError, PageSettings, Secret, from_toml, parse
from dpvoip.core.outcomes import Outcome
from dpvoip.core.texts import LANGUAGES, PAGE_WORDS
from dpvoip.crm.logins import session_auth_hash
from dpvoip.live.snapshot import (
    Client,
    LiveBox,
    LiveCall,
    LiveTicket,
    Ringing,
    Snapshot,
    Viewer,
)
from dpvoip.store.live_page import LivePageReads
from dpvoip.testing.memory import MemoryAccounts
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.live_page import (
    LivePages,
    LiveReads,
    PageView,
    day_start,
    load_static,
    page_words,
    popup_settings,
    render_page,
    talk_time,
)
from test.test_crm_logins import session

_real_reads: type[LiveReads] = LivePageReads  # mypy: the fake below fits the same Protocol

SECRET_KEY = "crm-secret-key-for-live-page-tests-0123456789"
PASSWORD = "pbkdf2_sha256$870000$salt$hash-of-the-password="
ATHENS = ZoneInfo("Europe/Athens")
NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)  # 11:30 in Athens
EVIL = "<script>alert('x')</script>&\"'"


def call(state: str = "ringing", **changes: Any) -> LiveCall:
    values: dict[str, Any] = dict(
        call_id="fb-office-20260302112800-0", state=state, direction="incoming",
        number="+306912345678", client=Client(7, "Papadopoulos AE"), extension=None,
        outcome=None, status="active", duration=None,
        at=datetime(2026, 3, 2, 9, 28, tzinfo=UTC), box="office")
    values.update(changes)
    return LiveCall(**values)


def snapshot(**changes: Any) -> Snapshot:
    values: dict[str, Any] = dict(
        in_progress=[call()],
        recent=[call("ended", call_id="zd-1", outcome="missed", status="missed",
                     duration=0, client=None, number="+302101234567", box="zadarma")],
        tickets=[LiveTicket(12, "zd-1", "+302101234567", None, 2,
                            datetime(2026, 3, 2, 8, 0, tzinfo=UTC))],
        boxes=[LiveBox("office", True, datetime(2026, 3, 2, 6, 0, tzinfo=UTC), 1.0)])
    values.update(changes)
    return Snapshot(**values)


VIEW = PageView("en", ATHENS, "/accounting/client/{id}/", 50)


class _Tree(HTMLParser):
    """The elements of a page, with their attributes and text, as a browser parses it."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: bytes) -> _Tree:
    tree = _Tree()
    tree.feed(page.decode("utf-8"))
    return tree


class RenderingTests(SynchronousTestCase):
    def test_every_part_of_the_snapshot_is_on_the_page(self) -> None:
        tree = parsed(render_page(snapshot(), VIEW))
        text = " ".join(tree.text)
        for shown in ("Calls in progress", "Papadopoulos AE", "+306912345678", "ringing",
                      "11:28:00", "Today's calls", "+302101234567", "missed", "0:00",
                      "Open missed-call tickets", "02/03 10:00", "office", "connected",
                      "since 02/03 08:00"):
            self.assertIn(shown, text)
        links = [a.get("href") for tag, a in tree.elements if tag == "a"]
        self.assertEqual(links, ["/accounting/client/7/"])
        rows = [a for tag, a in tree.elements if tag == "tr" and "data-call" in a]
        self.assertEqual([r["data-call"] for r in rows],
                         ["fb-office-20260302112800-0", "zd-1"])
        self.assertEqual([a["data-ticket"] for t, a in tree.elements if "data-ticket" in a],
                         ["12"])

    def test_numbers_names_and_ids_are_escaped(self) -> None:
        hostile = snapshot(
            in_progress=[call(client=Client(7, EVIL), number=EVIL, call_id=EVIL,
                              extension=EVIL, box=EVIL)],
            tickets=[LiveTicket(3, EVIL, EVIL, Client(9, EVIL), 1, NOW)],
            boxes=[LiveBox(EVIL, False, None, 1.0)])
        page = render_page(hostile, VIEW).decode()
        self.assertNotIn("<script>alert", page)
        self.assertNotIn("'x')", page)
        tree = parsed(page.encode())
        self.assertEqual([t for t, _ in tree.elements].count("script"), 1, "only live.js")
        self.assertIn(EVIL, tree.text, "shown as text, exactly")
        row = next(a for t, a in tree.elements if t == "tr" and "data-call" in a)
        self.assertEqual(row["data-call"], EVIL, "an attribute holds it whole, quotes too")

    def test_a_hostile_client_url_pattern_is_refused_by_the_configuration(self) -> None:
        for bad in ("javascript:alert(1)//{id}", "/c/{id}/' onclick='x", "/c/", "/c/{id}/{id}",
                    "/c/{id}/{name}"):
            with self.assertRaises(ConfigError, msg=bad):
                from_toml(parse(f'[page]\nclient_url = "{bad}"'))
        page = from_toml(parse('[page]\nclient_url = "https://crm.example/c/{id}?tab=1"'))
        self.assertEqual(page.page.client_url, "https://crm.example/c/{id}?tab=1")

    def test_the_page_loads_only_its_own_files(self) -> None:
        tree = parsed(render_page(snapshot(), VIEW))
        sources = [(t, a.get("src") or a.get("href")) for t, a in tree.elements
                   if t in ("script", "link")]
        self.assertEqual(sources, [("link", "static/live.css"), ("script", "static/live.js")],
                         "relative: the page works under any prefix the proxy gives it")
        self.assertNotIn("style=", render_page(snapshot(), VIEW).decode(),
                         "no inline style: the CSP would refuse it")

    def test_the_script_finds_its_settings_and_words_in_data_attributes(self) -> None:
        tree = parsed(render_page(snapshot(), VIEW))
        body = next(a for t, a in tree.elements if t == "body")
        words = json.loads(body["data-words"] or "")
        self.assertEqual(words["outcome:not reached"], "not reached")
        self.assertEqual(words["state_answered"], "in conversation")
        self.assertEqual((body["data-client-url"], body["data-zone"], body["data-lang"],
                          body["data-recent-limit"]),
                         ("/accounting/client/{id}/", "Europe/Athens", "en", "50"))

    def test_greek(self) -> None:
        page = render_page(snapshot(), replace(VIEW, language="el")).decode()
        tree = parsed(page.encode())
        text = " ".join(tree.text)
        for shown in ("Κλήσεις σε εξέλιξη", "Σημερινές κλήσεις", "χτυπάει", "αναπάντητη",
                      "εισερχόμενη", "συνδεδεμένο", "Ανοιχτά τίκετ αναπάντητων κλήσεων"):
            self.assertIn(shown, text)
        self.assertIn("<html lang='el'>", page)
        self.assertNotIn("Calls in progress", text)

    def test_both_languages_have_every_word(self) -> None:
        self.assertEqual(set(PAGE_WORDS["en"]), set(PAGE_WORDS["el"]))
        for language in LANGUAGES:
            words = page_words(language)
            for outcome in Outcome:
                self.assertIn(f"outcome:{outcome.value}", words)
            self.assertEqual(re.findall(r"{\w+}", words["box_since"]), ["{time}"])

    def test_a_withheld_caller_and_an_unknown_client(self) -> None:
        tree = parsed(render_page(snapshot(in_progress=[call(number="", client=None)]), VIEW))
        self.assertIn("withheld number", tree.text)
        self.assertEqual([a for t, a in tree.elements if t == "a"], [])

    def test_empty_lists_say_so(self) -> None:
        tree = parsed(render_page(Snapshot([], [], [], []), VIEW))
        notes = [a["data-empty-for"] for t, a in tree.elements
                 if t == "p" and "data-empty-for" in a and "hidden" not in a]
        self.assertEqual(notes, ["boxes", "in-progress", "recent", "tickets"])
        self.assertIn("No call in progress.", tree.text)

    def test_talk_time_and_the_day(self) -> None:
        self.assertEqual([talk_time(s) for s in (None, 0, 65, 3723)],
                         ["", "0:00", "1:05", "1:02:03"])
        self.assertEqual(day_start(NOW.timestamp(), ATHENS),
                         datetime(2026, 3, 2, 0, 0, tzinfo=ATHENS))
        late = datetime(2026, 3, 2, 22, 30, tzinfo=UTC).timestamp()  # 00:30 on the 3rd
        self.assertEqual(day_start(late, ATHENS), datetime(2026, 3, 3, 0, 0, tzinfo=ATHENS))

    def test_the_screen_pops_settings(self) -> None:
        settings = popup_settings(Viewer(4, False, ("100", "+30 210 7654321")),
                                  PageSettings(popup_for="everyone"), "el")
        self.assertEqual({k: settings[k] for k in ("popup_for", "staff", "numbers",
                                                   "client_url", "language")},
                         {"popup_for": "everyone", "staff": False,
                          "numbers": ["100", "+30 210 7654321"],
                          "client_url": "/accounting/client/{id}/", "language": "el"})
        self.assertEqual(settings["words"]["popup_ringing"], "Εισερχόμενη κλήση")


# --- the routes ----------------------------------------------------------------------------


@dataclass
class FakeReads:
    """The page's reads, in memory (the real ones: ``store.live_page``)."""

    shown: Snapshot
    staff: bool = True
    down: bool = False

    def __post_init__(self) -> None:
        self.asked: list[tuple[datetime, int | None, int, int]] = []
        self.ringing_asked: list[int | None] = []

    def viewer(self, user_id: int) -> Deferred[Viewer]:
        if self.down:
            return fail(_database_down())
        return succeed(Viewer(user_id, self.staff, ("100",)))

    def snapshot(self, day_start: datetime, viewer: int | None, recent: int,
                 tickets: int) -> Deferred[Snapshot]:
        self.asked.append((day_start, viewer, recent, tickets))
        return succeed(self.shown)

    def ringing(self, viewer: int | None) -> Deferred[Ringing]:
        self.ringing_asked.append(viewer)
        if self.down:
            return fail(_database_down())
        return succeed(Ringing([c for c in self.shown.in_progress if c.state == "ringing"],
                               self.shown.window))


def _database_down() -> Exception:
    import psycopg2

    return psycopg2.OperationalError("server closed the connection unexpectedly")


class RouteTests(SynchronousTestCase):
    language = "en"

    def setUp(self) -> None:
        from treq.testing import StubTreq

        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.accounts = MemoryAccounts(self.clock)
        self.reads = FakeReads(snapshot(window=(5, 20)))
        logins = Logins(self.accounts, Secret(SECRET_KEY), Secret(""), "sessionid",
                        self.clock)
        #: The live feed's watermark, and how many snapshots were read when it was asked.
        self.settled: int | None = None
        self.settled_asked: list[int] = []

        def settled() -> int | None:
            self.settled_asked.append(len(self.reads.asked))
            return self.settled

        live = LivePages(logins, self.reads, PageSettings(recent_calls=20), self.language,
                         ATHENS, self.clock, "/admin/login/", settled)

        def ready() -> Deferred[Readiness]:
            return succeed(Readiness(True))

        self.http: Any = StubTreq(WebApp(ready, "test", live_page=live).resource())
        self.anna = self.accounts.add_user("anna", password=PASSWORD, first_name="Anna")

    def sign_in(self) -> str:
        return self.accounts.add_session(session(
            {"_auth_user_id": str(self.anna),
             "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
             "_auth_user_hash": session_auth_hash(SECRET_KEY, PASSWORD)}, SECRET_KEY))

    def get(self, path: str, cookie: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        sent = dict(headers or {})
        if cookie:
            sent["Cookie"] = f"sessionid={cookie}"
        response = self.http.get("http://crm.example" + path, allow_redirects=False,
                                 headers=Headers({k: [v] for k, v in sent.items()}))
        self.http.flush()
        answer = self.successResultOf(response)
        body = self.successResultOf(self.http.content(answer))
        found = {k.decode().lower(): v[0].decode() for k, v in answer.headers.getAllRawHeaders()}
        return answer.code, found, body

    def test_a_signed_in_user_gets_the_page_with_a_strict_policy(self) -> None:
        status, headers, body = self.get("/voip/", self.sign_in())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        policy = headers["content-security-policy"]
        self.assertTrue(policy.startswith("default-src 'self';"), policy)
        self.assertNotIn("unsafe-inline", policy)
        self.assertNotIn("http", policy, "no other site")
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertEqual(headers["x-frame-options"], "SAMEORIGIN")
        self.assertIn(b"Papadopoulos AE", body)
        [(start, viewer, recent, tickets)] = self.reads.asked
        self.assertEqual((start, viewer, recent, tickets),
                         (datetime(2026, 3, 2, tzinfo=ATHENS), None, 20, 50),
                         "staff see every call; today's calls from the office's midnight")

    def resume_id(self) -> str | None:
        _, _, page = self.get("/voip/", self.sign_in())
        [body] = [attributes for tag, attributes in parsed(page).elements if tag == "body"]
        return body.get("data-last-event-id")

    def test_the_page_streams_the_events_after_those_its_snapshot_shows(self) -> None:
        """The watermark is read before the snapshot: every event up to it is on the
        page; the script's first stream asks for the ones after it (committed while the
        page loaded)."""
        self.assertIsNone(self.resume_id(), "the feed has settled nothing yet")
        self.settled = 15
        self.assertEqual(self.resume_id(), "15")
        self.assertEqual(self.settled_asked, [0, 1], "asked before each snapshot")
        self.settled = 3  # pruned since (kept: 5 to 20): the stream would ask to reload
        self.assertIsNone(self.resume_id())

    def test_a_user_who_is_not_staff_sees_only_their_calls(self) -> None:
        self.reads.staff = False
        self.get("/voip/", self.sign_in())
        self.assertEqual(self.reads.asked[0][1], self.anna)

    def test_nobody_signed_in_gets_a_401_page_with_the_sign_in_link(self) -> None:
        status, headers, body = self.get("/voip/")
        self.assertEqual(status, 401)
        self.assertIn("default-src 'self'", headers["content-security-policy"])
        self.assertIn(b"href='/admin/login/?next=%2Fvoip%2F'", body)
        self.assertNotIn(b"Papadopoulos", body)
        self.assertEqual(self.reads.asked, [])

    def test_a_forged_cookie_gets_the_401_page(self) -> None:
        forged = self.accounts.add_session(session(
            {"_auth_user_id": str(self.anna),
             "_auth_user_hash": session_auth_hash(SECRET_KEY, PASSWORD)}, "another-secret"))
        status, _, body = self.get("/voip/", forged)
        self.assertEqual(status, 401)
        self.assertNotIn(b"Papadopoulos", body)

    def test_the_database_down_is_a_503(self) -> None:
        cookie = self.sign_in()
        self.reads.down = True
        status, _, body = self.get("/voip/", cookie)
        self.assertEqual((status, body), (503, PAGE_WORDS["en"]["unavailable"].encode()))

    def test_without_the_trailing_slash_the_browser_is_sent_to_it(self) -> None:
        status, headers, _ = self.get("/voip")
        self.assertEqual((status, headers["location"]), (302, "voip/"),
                         "relative: the proxy's prefix is kept")

    def test_the_files_are_served_with_their_types_and_revalidated(self) -> None:
        files = load_static()
        for path, name, kind in (("/voip/static/live.js", "live.js", "text/javascript"),
                                 ("/voip/static/live.css", "live.css", "text/css"),
                                 ("/voip/popup.js", "popup.js", "text/javascript")):
            status, headers, body = self.get(path)
            self.assertEqual((status, body), (200, files[name].body), path)
            self.assertEqual(headers["content-type"], f"{kind}; charset=utf-8")
            self.assertEqual(headers["x-content-type-options"], "nosniff")
            status, _, body = self.get(path, headers={"If-None-Match": headers["etag"]})
            self.assertEqual((status, body), (304, b""))

    def test_no_other_file(self) -> None:
        for path in ("/voip/static/../app.py", "/voip/static/live_page.py",
                     "/voip/static/%2e%2e%2fconfig.py", "/voip/static/"):
            status, _, body = self.get(path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"import", body)

    def test_popup_settings_need_a_signed_in_user(self) -> None:
        status, headers, body = self.get("/voip/popup.json")
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["error"], "not signed in to the CRM")
        status, headers, body = self.get("/voip/popup.json", self.sign_in())
        self.assertEqual(status, 200)
        self.assertEqual(headers["cache-control"], "no-store")
        settings = json.loads(body)
        self.assertEqual((settings["popup_for"], settings["staff"], settings["numbers"]),
                         ("mine", True, ["100"]))

    def test_popup_settings_bring_the_calls_ringing_and_where_the_stream_resumes(
            self) -> None:
        """A CRM page opened while a call rings pops it up at once; its stream then asks
        for what committed after the read (the watermark was read before it)."""
        self.settled = 15
        _, _, body = self.get("/voip/popup.json", self.sign_in())
        settings = json.loads(body)
        [ringing] = settings["ringing"]
        self.assertEqual(ringing, {
            "call_id": "fb-office-20260302112800-0", "state": "ringing",
            "direction": "incoming", "number": "+306912345678",
            "client": {"id": 7, "name": "Papadopoulos AE"}, "extension": None,
            "outcome": None, "status": "active", "duration": None,
            "at": "2026-03-02T09:28:00Z", "box": "office"}, "the stream's wire format")
        self.assertEqual(settings["last_event_id"], 15)
        self.assertEqual((self.settled_asked, self.reads.ringing_asked), ([0], [None]))
        self.reads.staff = False
        self.settled = None
        settings = json.loads(self.get("/voip/popup.json", self.sign_in())[2])
        self.assertIsNone(settings["last_event_id"], "the feed has settled nothing yet")
        self.assertEqual(self.reads.ringing_asked[-1], self.anna, "only their calls")


class GreekRouteTests(RouteTests):
    language = "el"

    def test_the_page_is_greek(self) -> None:
        _, _, body = self.get("/voip/", self.sign_in())
        self.assertIn("Κλήσεις σε εξέλιξη".encode(), body)

    def test_the_database_down_is_a_503(self) -> None:
        cookie = self.sign_in()
        self.reads.down = True
        status, _, body = self.get("/voip/", cookie)
        self.assertEqual((status, body), (503, PAGE_WORDS["el"]["unavailable"].encode()))


