"""The web routes in memory: the real ``WebApp``, ``CallbackPages``, ``Logins``,
``ClickToCall`` and ``ZadarmaWebhook``, over the fakes of ``dpvoip.testing.memory``,
driven through ``treq.testing.StubTreq`` (HTTP parsed and written for real, no socket, no
PostgreSQL, a ``Clock`` for time).

They assert the contract ``test_click_to_call`` asserts end to end (the same statuses,
bodies and records), so that a route's behaviour can be pinned down in a few
milliseconds, and the end-to-end tests are left to prove the wiring, the SQL and the
signed HTTP to Zadarma.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from dpvoip.calls.ingest import ZadarmaContext
from dpvoip.click_to_call.callbacks import ClickToCall
from dpvoip.click_to_call.logins import Logins
from dpvoip.click_to_call.ports import (
    AccountStore,
    CallbackStore,
    ZadarmaCalls,
    ZadarmaClient,
)
from dpvoip.config import ClickToCallSettings, DirectorySettings, Secret
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.numbers import Dialling
from dpvoip.crm.logins import session_auth_hash
from dpvoip.spool.durable import NotRecorded
from dpvoip.store.accounts import Accounts
from dpvoip.store.callbacks import CallbackRecords, CallbackRequest
from dpvoip.testing.memory import (
    MemoryAccounts,
    MemoryCallbacks,
    MemoryRecorder,
    MemoryZadarmaApi,
    bad_answer,
    rate_limited,
    refused,
    timed_out,
    unreachable,
)
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.callback import CallbackPages, CallbackService, LoginService
from dpvoip.web.sources import networks
from dpvoip.web.zadarma import Recorder, ZadarmaWebhook
from dpvoip.zadarma.account import ZadarmaAccountApi
from dpvoip.zadarma.api import ZadarmaApi
from dpvoip.zadarma.signing import webhook_signature
from test.test_crm_logins import access_claims, forge_jwt, session

# What mypy proves: the real classes and the fakes fit the same Protocols, so a route
# test over the fakes exercises the code the daemon runs over the real ones.
_real_accounts: type[AccountStore] = Accounts
_memory_accounts: type[AccountStore] = MemoryAccounts
_real_callbacks: type[CallbackStore] = CallbackRecords
_memory_callbacks: type[CallbackStore] = MemoryCallbacks
_real_api: type[ZadarmaClient] = ZadarmaApi
_memory_api: type[ZadarmaClient] = MemoryZadarmaApi
_calls_api: type[ZadarmaCalls] = MemoryZadarmaApi
_account_api: type[ZadarmaAccountApi] = ZadarmaApi
_logins: type[LoginService] = Logins
_calls: type[CallbackService] = ClickToCall
_recorder: type[Recorder] = MemoryRecorder

SECRET_KEY = "crm-secret-key-for-tests-0123456789abcdef"
API_SECRET = "testsecret"
PASSWORD = "pbkdf2_sha256$870000$salt$hash-of-the-old-password="
CLIENT = "6912345678"
NOW = 1_800_000_000.0
HOST = "crm.example"
ORIGIN = f"http://{HOST}"
PAGE = f"{ORIGIN}/voip/get-callback/"
ZADARMA_PEER = "185.45.152.41"
NO_CONNECTION = ("You do not have a VoiP connection configured. Please contact your "
                 "administrator.")
DB_DOWN = "the CRM database is not reachable; try again shortly"


@dataclass(frozen=True)
class Answer:
    code: int
    body: str
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class RoutesCase(SynchronousTestCase):
    """The daemon's web surface built as the composition root builds it, from fakes."""

    click = ClickToCallSettings()
    allowed_origins: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.accounts = MemoryAccounts(self.clock)
        self.callbacks = MemoryCallbacks()
        self.api = MemoryZadarmaApi(self.clock)
        self.recorder = MemoryRecorder(names={CLIENT: "Maria Ioannou"})
        region = DirectorySettings().region
        policy = DiallingPolicy(frozenset(self.click.allowed_countries or (region,)),
                                self.click.blocked_prefixes, self.click.block_premium)
        pages = CallbackPages(
            Logins(self.accounts, Secret(SECRET_KEY), Secret(""), self.click.session_cookie,
                   self.clock),
            ClickToCall(self.callbacks, self.api, policy, Dialling(region),
                        self.click.per_user_per_minute, self.clock),
            self.allowed_origins, self.click.login_url, self.clock,
            proxies=networks(["127.0.0.1/32"]))  # StubTreq's client: the CRM's proxy
        self.webhook = ZadarmaWebhook(
            recorder=self.recorder,
            context=ZadarmaContext(Dialling(region), ZoneInfo("Europe/Athens")),
            secret=Secret(API_SECRET), allowlist=networks(["185.45.152.0/24"]),
            proxies=networks(["127.0.0.1/32"]))  # StubTreq's client is 127.0.0.1

        def ready() -> Deferred[Readiness]:
            return succeed(Readiness(True))

        # StubTreq makes treq's functions its attributes at run time: mypy cannot see them.
        self.http: Any = StubTreq(WebApp(ready, "test", self.webhook, pages).resource())
        self.anna = self.accounts.add_user("anna", password=PASSWORD, first_name="Anna",
                                           last_name="Papa")
        self.connection = self.callbacks.add_connection(
            self.anna, "100", callerid="Anna desk", provider="Zadarma")

    # -- the CRM's logins ------------------------------------------------------------------

    def sign_in(self, user: int | None = None, password: str = PASSWORD,
                lifetime: float = 86400.0) -> str:
        """A session as Django writes it; the cookie value is its key."""
        user = self.anna if user is None else user
        return self.accounts.add_session(session(
            {"_auth_user_id": str(user),
             "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
             "_auth_user_hash": session_auth_hash(SECRET_KEY, password)}, SECRET_KEY),
            lifetime)

    def jwt(self, user: int | None = None, key: str = SECRET_KEY, **claims: object) -> str:
        user = self.anna if user is None else user
        fields: dict[str, object] = {"user_id": str(user), "exp": int(NOW) + 300, **claims}
        return forge_jwt(access_claims(**fields), key)

    # -- HTTP, in memory -------------------------------------------------------------------

    def request(self, method: str, url: str, headers: dict[str, str],
                body: bytes | None = None) -> Answer:
        sent = Headers({k: [v] for k, v in headers.items()})
        response = self.http.request(method, url, headers=sent, data=body,
                                     allow_redirects=False)
        self.http.flush()
        answer = self.successResultOf(response)
        content = self.successResultOf(self.http.content(answer))
        found = {k.decode().lower(): v[0].decode()
                 for k, v in answer.headers.getAllRawHeaders()}
        return Answer(answer.code, content.decode("utf-8"), found)

    def get(self, query: str = "", cookie: str | None = None, accept: str = "text/html",
            bearer: str | None = None, url: str | None = None) -> Answer:
        headers = {"Accept": accept}
        if cookie:
            headers["Cookie"] = f"sessionid={cookie}"
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        return self.request("GET", url or PAGE + (f"?{query}" if query else ""), headers)

    def post_form(self, fields: dict[str, str], cookie: str | None = None,
                  origin: str | None = ORIGIN, referer: str | None = None, query: str = "",
                  extra: dict[str, str] | None = None) -> Answer:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(extra or {})}
        if cookie:
            headers["Cookie"] = f"sessionid={cookie}"
        if origin is not None:
            headers["Origin"] = origin
        if referer is not None:
            headers["Referer"] = referer
        return self.request("POST", PAGE + (f"?{query}" if query else ""), headers,
                            urlencode(fields).encode())

    def post_json(self, body: object, bearer: str | None = None, raw: bytes | None = None,
                  ) -> Answer:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        data = raw if raw is not None else json.dumps(body).encode()
        return self.request("POST", PAGE, headers, data)

    def call_form(self, number: str = CLIENT) -> dict[str, str]:
        return {"callerid": str(self.connection), "to_number": number}

    def call_json(self, number: str = CLIENT) -> dict[str, object]:
        return {"connection": self.connection, "number": number}

    def dialled(self) -> list[dict[str, str | int]]:
        return [asked.params for asked in self.api.callbacks]

    def recorded(self) -> list[tuple[Any, ...]]:
        """The records as ``test_click_to_call`` reads them from the table."""
        return [(r.user_id, r.login, r.connection_id, r.number_given, r.number_dialled,
                 r.result, r.http_status) for r in self.callbacks.records]


class PageTests(RoutesCase):
    def test_the_popup_shows_the_number_and_the_users_connections_and_dials_nothing(
            self) -> None:
        answer = self.get(f"number={CLIENT}", self.sign_in())
        self.assertEqual(answer.code, 200)
        self.assertIn("text/html", answer.headers["content-type"])
        self.assertIn(f"value='{CLIENT}'", answer.body)
        self.assertIn(f"<option value='{self.connection}'>Anna desk (Zadarma)</option>",
                      answer.body)
        self.assertIn("Signed in as Anna Papa.", answer.body)
        self.assertIn("frame-ancestors 'self'", answer.headers["content-security-policy"])
        self.assertEqual(self.dialled(), [])

    def test_a_get_carrying_every_field_of_a_call_still_never_dials(self) -> None:
        query = urlencode({"number": CLIENT, **self.call_form()})
        for accept in ("text/html", "application/json"):
            self.assertEqual(self.get(query, self.sign_in(), accept=accept).code, 200)
        self.assertEqual(self.get(query, bearer=self.jwt()).code, 200)
        self.assertEqual((self.dialled(), self.recorded()), ([], []))

    def test_json_lists_the_active_connections_of_this_user_only(self) -> None:
        self.callbacks.add_connection(self.anna, "101", callerid="old", active=False)
        bob = self.accounts.add_user("bob", password=PASSWORD)
        self.callbacks.add_connection(bob, "102", callerid="Bob")
        answer = self.get(f"number={CLIENT}", self.sign_in(), accept="application/json")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json(), {
            "number": CLIENT, "user": "anna",
            "connections": [{"id": self.connection, "type": "pbx", "number": "100",
                             "callerid": "Anna desk", "provider": "Zadarma"}]})

    def test_a_user_without_a_connection_gets_the_crms_own_text(self) -> None:
        bob = self.accounts.add_user("bob", password=PASSWORD)
        answer = self.get(f"number={CLIENT}", self.sign_in(bob))
        self.assertEqual((answer.code, answer.body), (200, NO_CONNECTION))
        self.assertTrue(answer.headers["content-type"].startswith("text/plain"))
        answer = self.get(f"number={CLIENT}", self.sign_in(bob), accept="application/json")
        self.assertEqual(answer.json(), {"number": CLIENT, "user": "bob", "connections": [],
                                         "message": NO_CONNECTION})

    def test_nobody_signed_in_gets_a_sign_in_hint(self) -> None:
        answer = self.get(f"number={CLIENT}")
        self.assertEqual(answer.code, 401)
        self.assertIn("/admin/login/?next=%2Fvoip%2Fget-callback%2F%3Fnumber%3D6912345678",
                      answer.body)
        answer = self.get(f"number={CLIENT}", accept="application/json")
        self.assertEqual(answer.code, 401)
        self.assertEqual(answer.json(), {
            "error": "not signed in to the CRM", "status": 401,
            "login_url": "/admin/login/?next=%2Fvoip%2Fget-callback%2F%3Fnumber%3D6912345678"})

    def test_a_database_that_does_not_answer_is_a_503(self) -> None:
        self.accounts.unreachable = True
        answer = self.get(f"number={CLIENT}", self.sign_in(), accept="application/json")
        self.assertEqual((answer.code, answer.json()["error"]), (503, DB_DOWN))
        self.accounts.unreachable = False
        self.callbacks.unreachable = True
        answer = self.get(f"number={CLIENT}", self.sign_in(), accept="application/json")
        self.assertEqual(answer.code, 503)


class DialTests(RoutesCase):
    def test_the_popup_form_dials_through_zadarma_with_the_signed_parameters(self) -> None:
        answer = self.post_form(self.call_form("210 123 4567"), self.sign_in())
        self.assertEqual((answer.code, answer.body), (200, "Expect a call to your smartphone"))
        [asked] = self.api.callbacks
        self.assertEqual(asked.query, "from=100&to=%2B302101234567")
        self.assertEqual(self.recorded(), [
            (self.anna, "session", self.connection, "210 123 4567", "+302101234567",
             "dialled", 200)])

    def test_json_in_json_out_with_sip_and_predicted(self) -> None:
        answer = self.post_json({"connection": self.connection, "number": "+30 691 234 5678",
                                 "sip": "100", "predicted": True}, bearer=self.jwt())
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json(), {"ok": True,
                                         "message": "Expect a call to your smartphone",
                                         "number": "+306912345678"})
        self.assertEqual(self.dialled(), [{"from": "100", "to": "+306912345678", "sip": "100",
                                           "predicted": 1}])
        self.assertEqual(self.recorded()[0][:2], (self.anna, "jwt"))

    def test_fields_only_in_the_query_string_of_a_post_do_not_dial(self) -> None:
        answer = self.post_form({}, self.sign_in(), query=urlencode(self.call_form()))
        self.assertEqual(answer.code, 400)
        self.assertTrue(answer.body.startswith("Error! "))
        self.assertEqual(self.dialled(), [])

    def test_another_users_or_an_inactive_connection_is_refused(self) -> None:
        bob = self.accounts.add_user("bob", password=PASSWORD)
        answer = self.post_form(self.call_form(), self.sign_in(bob))
        self.assertEqual(answer.code, 403)
        self.assertIn("not one of your active connections", answer.body)
        self.callbacks.set_active(self.connection, False)
        self.assertEqual(self.post_form(self.call_form(), self.sign_in()).code, 403)
        self.assertEqual(self.dialled(), [])
        self.assertEqual([r[5:] for r in self.recorded()], [("refused", 403)] * 2)

    def test_premium_and_blocked_numbers_are_never_dialled(self) -> None:
        cookie = self.sign_in()
        for number in ("+30 901 123 4567", "+44 909 876 0000", "+355 4 222 3456", "12"):
            answer = self.post_form(self.call_form(number), cookie)
            self.assertEqual(answer.code, 400, number)
            self.assertTrue(answer.body.startswith("Error! "), answer.body)
        self.assertEqual(self.dialled(), [])
        self.assertEqual([r[5] for r in self.recorded()], ["refused"] * 4)
        self.assertEqual([r[4] for r in self.recorded()], [None] * 4)

    def test_odd_fields_are_400s_and_recorded(self) -> None:
        cookie = self.sign_in()
        for form in ({"callerid": "\u00b2", "to_number": CLIENT},
                     {"callerid": str(self.connection), "to_number": "69\x00123"},
                     {"callerid": str(self.connection), "to_number": CLIENT, "sip": "12"}):
            answer = self.post_form(form, cookie)
            self.assertEqual(answer.code, 400, form)
        self.assertEqual([r[5:] for r in self.recorded()], [("refused", 400)] * 3)
        self.assertEqual(self.callbacks.records[1].number_given, "69\ufffd123")
        self.assertEqual(self.dialled(), [])

    def test_odd_json_is_a_400_never_a_500(self) -> None:
        token = self.jwt()
        for raw in (b"[" * 30000, b"\xff", b"[1]", b'{"connection": true, "number": "1"}',
                    b'{"connection": 1}'):
            answer = self.post_json(None, bearer=token, raw=raw)
            self.assertEqual(answer.code, 400, raw[:40])
            self.assertIn("error", answer.json())
        self.assertEqual(self.dialled(), [])

    def test_an_unrecorded_request_still_gets_its_answer(self) -> None:
        self.callbacks.record_error = RuntimeError("the disk is full")
        answer = self.post_form(self.call_form(), self.sign_in())
        self.assertEqual((answer.code, answer.body), (200, "Expect a call to your smartphone"))
        self.assertEqual(len(self.dialled()), 1)

    def test_a_database_that_does_not_answer_is_a_503_and_nothing_is_dialled(self) -> None:
        self.callbacks.unreachable = True
        answer = self.post_json(self.call_json(), bearer=self.jwt())
        self.assertEqual((answer.code, answer.json()["error"]), (503, DB_DOWN))
        self.accounts.unreachable = True
        answer = self.post_form(self.call_form(), self.sign_in())
        self.assertEqual((answer.code, answer.body), (503, f"Error! {DB_DOWN}"))
        self.assertEqual(self.dialled(), [])


class OriginTests(RoutesCase):
    def test_a_cookie_post_from_a_foreign_site_is_refused(self) -> None:
        cookie = self.sign_in()
        for origin, referer in (("https://evil.example", None), (None, None),
                                (None, "https://evil.example/page"), ("null", None)):
            answer = self.post_form(self.call_form(), cookie, origin=origin, referer=referer)
            self.assertEqual(answer.code, 403, (origin, referer))
            self.assertIn("CRM's own pages", answer.body)
        self.assertEqual(self.dialled(), [])
        self.assertEqual([r[:2] + r[5:] for r in self.recorded()],
                         [(self.anna, "session", "refused", 403)] * 4)

    def test_the_referer_of_the_crms_own_page_or_the_browsers_mark_is_enough(self) -> None:
        cookie = self.sign_in()
        answer = self.post_form(self.call_form(), cookie, origin=None,
                                referer=ORIGIN + "/admin/crm/contact/7/")
        self.assertEqual(answer.code, 200)
        answer = self.post_form(self.call_form(), cookie, origin="https://crm.example.com",
                                extra={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(answer.code, 200)

    def test_a_bearer_token_needs_no_origin(self) -> None:
        self.assertEqual(self.post_json(self.call_json(), bearer=self.jwt()).code, 200)

    def test_behind_a_proxy_the_forwarded_host_counts_and_a_cross_site_post_does_not(
            self) -> None:
        cookie, crm = self.sign_in(), "https://crm.example.com"
        for forwarded, origin in (("crm.example.com:443", crm),
                                  ("crm.example.com", crm + ":8443"),
                                  ("CRM.example.com", crm)):
            answer = self.post_form(self.call_form(), cookie, origin=origin,
                                    extra={"X-Forwarded-Host": forwarded})
            self.assertEqual(answer.code, 200, (forwarded, origin))
        for extra in ({"Sec-Fetch-Site": "cross-site"},
                      {"X-Forwarded-Host": "crm.example.com:8443"},
                      {"Sec-Fetch-Site": "same-site"}):
            answer = self.post_form(self.call_form(), cookie, origin=crm, extra=extra)
            self.assertEqual(answer.code, 403, extra)
        self.assertEqual(len(self.dialled()), 3)

    def test_basic_auth_of_a_proxy_does_not_hide_the_session(self) -> None:
        answer = self.post_form(self.call_form(), self.sign_in(),
                                extra={"Authorization": "Basic YWRtaW46cHc="})
        self.assertEqual(answer.code, 200)


class AllowedOriginTests(RoutesCase):
    allowed_origins = ("https://crm.example",)

    def test_only_the_configured_origins_count_when_some_are_set(self) -> None:
        cookie = self.sign_in()
        self.assertEqual(self.post_form(self.call_form(), cookie).code, 403)  # http: not listed
        answer = self.post_form(self.call_form(), cookie, origin="https://crm.example")
        self.assertEqual(answer.code, 200)


class NotSignedInTests(RoutesCase):
    def test_nobody_signed_in_is_a_401_recorded_as_nobody(self) -> None:
        answer = self.post_form(self.call_form())
        self.assertEqual((answer.code, answer.body), (401, "Error! not signed in to the CRM"))
        answer = self.post_json(self.call_json())
        self.assertEqual(answer.json(), {"error": "not signed in to the CRM", "status": 401})
        self.assertEqual(self.recorded(), [
            (None, "none", self.connection, CLIENT, None, "refused", 401)] * 2)
        self.assertEqual(self.dialled(), [])

    def test_a_flood_of_anonymous_posts_is_cut_off_and_not_all_recorded(self) -> None:
        codes = [self.post_form(self.call_form()).code for _ in range(25)]
        self.assertEqual(codes, [401] * 20 + [429] * 5)
        self.assertEqual(len(self.recorded()), 20)
        self.clock.advance(60)
        self.assertEqual(self.post_form(self.call_form()).code, 401)

    def test_an_expired_session_is_refused(self) -> None:
        cookie = self.sign_in(lifetime=60)
        self.assertEqual(self.post_form(self.call_form(), cookie).code, 200)
        self.clock.advance(60)
        answer = self.post_form(self.call_form(), cookie)
        self.assertEqual(answer.code, 401)
        self.assertIn("expired", answer.body)
        self.assertEqual(self.recorded()[-1][:2], (None, "none"))

    def test_a_session_from_before_a_password_change_is_refused(self) -> None:
        cookie = self.sign_in()
        self.accounts.change_user(self.anna, password="pbkdf2_sha256$870000$x$new=")
        answer = self.post_form(self.call_form(), cookie)
        self.assertEqual(answer.code, 401)
        self.assertIn("password changed", answer.body)

    def test_a_tampered_unknown_or_malformed_cookie_is_refused(self) -> None:
        cookie = self.sign_in()
        stored = self.accounts.sessions[cookie]
        stored.data = stored.data.replace(":", "x:", 1)
        answer = self.post_form(self.call_form(), cookie)
        self.assertEqual((answer.code, answer.body),
                         (401, "Error! the CRM session is not valid (bad session signature)"))
        answer = self.post_form(self.call_form(), "0" * 32)
        self.assertEqual(answer.code, 401)
        self.assertIn("expired or was signed out", answer.body)
        answer = self.post_form(self.call_form(), "../../etc")
        self.assertEqual(answer.code, 401)
        self.assertIn("malformed", answer.body)
        self.assertEqual(self.dialled(), [])

    def test_an_inactive_users_session_is_refused(self) -> None:
        cookie = self.sign_in()
        self.accounts.change_user(self.anna, is_active=False)
        answer = self.post_form(self.call_form(), cookie)
        self.assertEqual(answer.code, 401)
        self.assertIn("not active", answer.body)

    def test_expired_foreign_and_refresh_jwts_are_refused(self) -> None:
        for token, reason in ((self.jwt(exp=int(NOW) - 5), "expired"),
                              (self.jwt(key="another-key" * 4), "signature"),
                              (self.jwt(token_type="refresh"), "not an access token")):
            answer = self.post_json(self.call_json(), bearer=token)
            self.assertEqual(answer.code, 401, answer.body)
            self.assertIn(reason, answer.json()["error"])
        self.assertEqual(self.dialled(), [])

    def test_a_jwt_expires_on_the_clock_it_is_given(self) -> None:
        token = self.jwt()
        self.assertEqual(self.post_json(self.call_json(), bearer=token).code, 200)
        self.clock.advance(301)
        answer = self.post_json(self.call_json(), bearer=token)
        self.assertEqual(answer.code, 401)
        self.assertIn("expired", answer.json()["error"])

    def test_a_dpvoip_token_works_until_it_is_revoked(self) -> None:
        token_id, token = self.accounts.issue_token(self.anna, "script")
        self.assertEqual(self.post_json(self.call_json(), bearer=token).code, 200)
        self.assertEqual(self.recorded()[-1][:2], (self.anna, "token"))
        self.assertEqual(self.accounts.last_used(token), NOW)
        self.assertTrue(self.accounts.revoke_token(token_id))
        answer = self.post_json(self.call_json(), bearer=token)
        self.assertEqual(answer.code, 401)
        self.assertIn("revoked", answer.json()["error"])
        answer = self.post_json(self.call_json(), bearer="dpv_" + "a" * 43)
        self.assertIn("unknown or revoked", answer.json()["error"])

    def test_a_token_of_a_user_deactivated_since_is_refused(self) -> None:
        _, token = self.accounts.issue_token(self.anna)
        self.accounts.change_user(self.anna, is_active=False)
        answer = self.post_json(self.call_json(), bearer=token)
        self.assertEqual((answer.code, answer.json()["error"]),
                         (401, "the CRM user of this token is not active"))


class LimitTests(RoutesCase):
    click = replace(ClickToCallSettings(), per_user_per_minute=3)

    def test_the_fourth_call_in_a_minute_is_refused_with_retry_after(self) -> None:
        cookie = self.sign_in()
        answers = [self.post_form(self.call_form(), cookie) for _ in range(4)]
        self.assertEqual([a.code for a in answers], [200, 200, 200, 429])
        self.assertEqual(answers[-1].headers["retry-after"], "60")
        self.assertEqual(len(self.dialled()), 3)
        self.assertEqual(self.recorded()[-1][5:], ("refused", 429))
        bob = self.accounts.add_user("bob", password=PASSWORD)
        bobs = self.callbacks.add_connection(bob, "101", callerid="Bob")
        answer = self.post_form({"callerid": str(bobs), "to_number": CLIENT},
                                self.sign_in(bob))
        self.assertEqual(answer.code, 200)  # another user has a budget of their own
        self.clock.advance(60)
        self.assertEqual(self.post_form(self.call_form(), cookie).code, 200)


class ZadarmaFailureTests(RoutesCase):
    """Zadarma's failures, scripted as the real client raises them, answered with the
    statuses the end-to-end tests see from the HTTP fake."""

    def test_zadarmas_error_is_a_502_with_its_message(self) -> None:
        self.api.fail_next(refused("Wrong phone number"))
        answer = self.post_form(self.call_form(), self.sign_in())
        self.assertEqual((answer.code, answer.body), (502, "Error! Wrong phone number"))
        self.assertEqual(self.recorded()[-1][5:], ("refused", 502))

    def test_a_silent_zadarma_is_a_504(self) -> None:
        self.api.fail_next(timed_out(1.0))
        answer = self.post_json(self.call_json(), bearer=self.jwt())
        self.assertEqual(answer.code, 504)
        self.assertEqual(answer.json()["error"], "Zadarma did not answer within 1 s")

    def test_zadarmas_rate_limit_is_a_429_with_retry_after(self) -> None:
        self.api.fail_next(rate_limited(30))
        answer = self.post_form(self.call_form(), self.sign_in())
        self.assertEqual((answer.code, answer.headers["retry-after"]), (429, "30"))

    def test_an_answer_that_is_not_json_or_no_connection_is_a_502(self) -> None:
        self.api.fail_next(bad_answer())
        answer = self.post_form(self.call_form(), self.sign_in())
        self.assertEqual(answer.code, 502)
        self.assertIn("no JSON", answer.body)
        self.api.fail_next(unreachable())
        answer = self.post_json(self.call_json(), bearer=self.jwt())
        self.assertEqual(answer.code, 502)
        self.assertIn("cannot connect to Zadarma", answer.json()["error"])
        self.assertEqual(self.dialled(), [])
        self.assertEqual(self.post_form(self.call_form(), self.sign_in()).code, 200)


class RecordingTests(RoutesCase):
    def setUp(self) -> None:
        super().setUp()
        # taken by extension 100, Anna's connection: she may hear it
        self.callbacks.add_call("zd-in_1", "1700000000.123", crm_call_id=41, legs=("100",))
        self.callbacks.add_call("zd-in_2", "", crm_call_id=42, legs=("100",))

    def recording(self, call: object, **login: str) -> Answer:
        return self.get(url=f"{ORIGIN}/voip/calls/{call}/recording", **login)

    def test_a_signed_in_user_is_sent_to_a_fresh_link(self) -> None:
        self.api.add_recording("1700000000.123")
        answer = self.recording(41, cookie=self.sign_in())
        self.assertEqual(answer.code, 302)
        self.assertTrue(answer.headers["location"].endswith("1700000000.123.mp3"))
        self.assertEqual(answer.headers["referrer-policy"], "no-referrer")
        self.assertEqual(self.recording("zd-in_1", bearer=self.jwt()).code, 302)
        self.assertEqual(self.api.recordings_asked, ["1700000000.123"] * 2)

    def test_a_recording_zadarma_no_longer_has_is_404(self) -> None:
        answer = self.recording(41, bearer=self.jwt())
        self.assertEqual(answer.code, 404)
        self.assertIn("no longer has", answer.body)
        self.assertEqual(self.recording("%C2%B2", bearer=self.jwt()).code, 400)

    def test_a_call_without_recording_is_404_and_nobody_signed_in_401(self) -> None:
        answer = self.recording(42, cookie=self.sign_in())
        self.assertEqual((answer.code, answer.json()["error"]),
                         (404, "this call has no recording"))
        self.assertEqual(self.recording(42).code, 401)
        self.assertEqual(self.recording(999, bearer=self.jwt()).code, 404)
        self.assertEqual(self.api.recordings_asked, [])

    def test_zadarmas_failures_keep_their_status_and_retry_after(self) -> None:
        self.api.fail_next(rate_limited(12))
        answer = self.recording(41, bearer=self.jwt())
        self.assertEqual((answer.code, answer.headers["retry-after"]), (429, "12"))
        self.api.fail_next(unreachable())
        self.assertEqual(self.recording(41, bearer=self.jwt()).code, 502)

    def test_links_are_rationed_per_user(self) -> None:
        self.api.add_recording("1700000000.123")
        token = self.jwt()
        codes = [self.recording(41, bearer=token).code for _ in range(21)]
        self.assertEqual(codes, [302] * 20 + [429])
        self.assertEqual(len(self.api.recordings_asked), 20)

    def test_a_database_that_does_not_answer_is_a_503(self) -> None:
        self.callbacks.unreachable = True
        self.assertEqual(self.recording(41, bearer=self.jwt()).code, 503)


EVENT = {"event": "NOTIFY_START", "pbx_call_id": "in_" + "a" * 40,
         "call_start": "2026-01-15 10:00:00", "caller_id": CLIENT,
         "called_did": "302107654321"}


class WebhookTests(RoutesCase):
    def send_event(self, form: dict[str, str] = EVENT, signature: str | None = None,
                   sender: str = ZADARMA_PEER) -> Answer:
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Signature": signature or webhook_signature(API_SECRET, form) or "",
                   "X-Forwarded-For": sender}
        return self.request("POST", f"{ORIGIN}/voip/zd/", headers, urlencode(form).encode())

    def test_the_echo_answers_exactly_the_token(self) -> None:
        answer = self.get(url=f"{ORIGIN}/voip/zd/?zd_echo=a1b2")
        self.assertEqual((answer.code, answer.body), (200, "a1b2"))
        self.assertEqual(self.get(url=f"{ORIGIN}/voip/zd/").code, 400)

    def test_a_signed_event_is_recorded_and_the_caller_named(self) -> None:
        answer = self.send_event()
        self.assertEqual((answer.code, answer.json()), (200, {"caller_name": "Maria Ioannou"}))
        [(event, form, context)] = self.recorder.events
        self.assertEqual((event.kind, event.caller_id, form), ("NOTIFY_START", CLIENT, EVENT))
        self.assertEqual(context.zone, ZoneInfo("Europe/Athens"))

    def test_the_owners_extension_is_answered_as_the_redirect(self) -> None:
        self.recorder.owners = {CLIENT: "101"}
        answer = self.send_event()
        self.assertEqual(answer.json(), {"caller_name": "Maria Ioannou", "redirect": "101"})
        answer = self.send_event({**EVENT, "event": "NOTIFY_END", "duration": "5",
                                  "disposition": "answered"})
        self.assertEqual((answer.code, answer.body), (200, ""))  # only a start is answered

    def test_a_repeated_event_is_a_duplicate_answered_alike(self) -> None:
        self.send_event()
        self.assertEqual(self.send_event().code, 200)
        self.assertEqual(len(self.recorder.events), 1)
        self.assertEqual((self.webhook.counters.recorded, self.webhook.counters.duplicates),
                         (1, 1))

    def test_a_bad_signature_or_a_foreign_sender_records_nothing(self) -> None:
        self.assertEqual(self.send_event(signature="x" * 28).code, 401)
        self.assertEqual(self.send_event(sender="203.0.113.9").code, 403)
        self.assertEqual(self.recorder.events, [])
        self.assertEqual(self.webhook.counters.refused, {401: 1, 403: 1})

    def test_an_event_that_cannot_be_kept_is_a_503(self) -> None:
        self.recorder.error = NotRecorded("the spool is full")
        answer = self.send_event()
        self.assertEqual(answer.json(), {"error": "the spool is full", "status": 503})


class MemoryFakeTests(SynchronousTestCase):
    """The fakes on the points the routes rely on, beyond what the routes show."""

    def test_the_memory_api_answers_the_account_service_and_refuses_without_keys(
            self) -> None:
        api = MemoryZadarmaApi(Clock(), zone="UTC+2")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(api.timezone())),
                         "UTC+2")
        api.fail_next(unreachable(), times=2)
        for _ in range(2):
            self.failureResultOf(Deferred.fromCoroutine(api.timezone()))
        self.successResultOf(Deferred.fromCoroutine(api.callback("100", "+306912345678")))
        idle = MemoryZadarmaApi(Clock(), configured=False)
        self.assertFalse(idle.configured)
        failure = self.failureResultOf(Deferred.fromCoroutine(idle.callback("100", CLIENT)))
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(idle.callbacks, [])

    def test_records_keep_what_click_to_call_writes(self) -> None:
        store = MemoryCallbacks()
        row = CallbackRequest(1, "jwt", None, None, "x", None, "refused", 400, "no")
        self.successResultOf(Deferred.fromCoroutine(store.record(row)))
        self.assertEqual(store.records, [row])
