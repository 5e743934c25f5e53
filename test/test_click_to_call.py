"""Click-to-call as a CRM user meets it: the daemon as wired, a real PostgreSQL with the
CRM's tables, the CRM's own logins (a Django session cookie, a simplejwt access token, a
dpvoip token), and the fake Zadarma API on loopback checking every signature."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import psycopg2
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from txpostgres.reconnection import ConnectionDead

from dpvoip.click_to_call.callbacks import WINDOW, ClickToCall, window_wait
from dpvoip.click_to_call.errors import DatabaseUnreachable
from dpvoip.click_to_call.logins import CrmUser, Logins
from dpvoip.config import (
    ClickToCallSettings,
    CrmSettings,
    DatabaseSettings,
    Secret,
    ZadarmaSettings,
)
from dpvoip.core.numbers import Dialling
from dpvoip.crm.logins import session_auth_hash
from dpvoip.service import Daemon, build
from dpvoip.store.accounts import Accounts
from dpvoip.store.callbacks import PENDING, PENDING_MESSAGE, CallbackRecords, CallbackRequest
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from dpvoip.store.tokens import create_token, revoke_token
from dpvoip.testing.memory import MemoryCallbacks
from dpvoip.testing.zadarma import Fault, ZadarmaFake
from dpvoip.web.callback import CallbackPages
from dpvoip.web.errors import HttpError
from test.support.crm import Crm
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.tls import make_authority
from test.support.wiring import in_process
from test.test_crm_logins import access_claims, forge_jwt, session
from test.test_database import eventually

SECRET_KEY = "crm-secret-key-for-tests-0123456789abcdef"
KEY, API_SECRET = "testkey", "testsecret"
PASSWORD = "pbkdf2_sha256$870000$salt$hash-of-the-old-password="
CLIENT = "6912345678"

if TYPE_CHECKING:
    _Case = TestCase
else:
    _Case = object


class ClickToCallCase(TestCase):
    timeout = 2 * PATIENCE  # a hang detector (a database per test; seconds when idle)
    click = ClickToCallSettings()
    #: The API deadline, on the real clock: only a hang reaches it, so a loaded machine
    #: never turns Zadarma's answer into a 504.
    api_timeout = 60.0
    allowed_origins: tuple[str, ...] = ()

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        self.fake = ZadarmaFake(KEY, API_SECRET, reactor)
        self.addCleanup(self.fake.close)
        self.anna = self.crm.user("anna", password=PASSWORD, first_name="Anna",
                                  last_name="Papa")
        self.connection = self.crm.insert(
            "voip_connection", type="pbx", active=True, number="100", callerid="Anna desk",
            provider="Zadarma", owner_id=self.anna)
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        port = await self.fake.listen(reactor, "tcp:0:interface=127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.daemon = self.start_daemon(url)
        self.daemon.service.startService()
        self.addCleanup(self.daemon.service.stopService)
        await self.daemon.service.started
        await eventually(lambda: self.daemon.schema.fired, PATIENCE)

    def start_daemon(self, api_url: str, ca_file: str = "") -> Daemon:
        config = in_process(
            self.dsn,
            crm=replace(CrmSettings(), secret_key=Secret(SECRET_KEY),
                        allowed_origins=self.allowed_origins),
            zadarma=replace(ZadarmaSettings(), key=Secret(KEY), secret=Secret(API_SECRET),
                            api_url=api_url, api_timeout=self.api_timeout,
                            api_ca_file=ca_file),
            click_to_call=self.click)
        return build(config, reactor, scratch(self))

    # -- the CRM's logins ------------------------------------------------------------------

    def sign_in(self, user: int | None = None, password: str = PASSWORD,
                expires: str = "now() + interval '1 day'") -> str:
        """A session row as Django writes it; the cookie value is its key."""
        user = self.anna if user is None else user
        key = secrets.token_hex(16)
        data = session({"_auth_user_id": str(user),
                        "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                        "_auth_user_hash": session_auth_hash(SECRET_KEY, password)},
                       SECRET_KEY)
        self.crm.query(
            f"INSERT INTO django_session VALUES (%s, %s, {expires}) RETURNING 1", (key, data))
        return key

    def jwt(self, user: int | None = None, key: str = SECRET_KEY, **claims: object) -> str:
        user = self.anna if user is None else user
        fields: dict[str, object] = {"user_id": str(user), "exp": int(time.time()) + 300,
                                     **claims}
        return forge_jwt(access_claims(**fields), key)

    # -- HTTP ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/voip/get-callback/"

    @property
    def origin(self) -> str:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def _request(self, method: str, url: str, headers: dict[str, str],
                       body: bytes | None) -> tuple[int, str, dict[str, str]]:
        sent: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in headers.items()}
        response = await treq.request(
            method, url, headers=sent, data=body,
            pool=self.http, allow_redirects=False)
        text = (await response.content()).decode("utf-8")
        found = {k.decode().lower(): v[0].decode()
                 for k, v in response.headers.getAllRawHeaders()}
        return response.code, text, found

    def get(self, query: str = "", cookie: str | None = None, accept: str = "text/html",
            bearer: str | None = None, url: str | None = None,
            ) -> defer.Deferred[tuple[int, str, dict[str, str]]]:
        headers = {"Accept": accept}
        if cookie:
            headers["Cookie"] = f"sessionid={cookie}"
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        target = url or self.url + (f"?{query}" if query else "")
        return defer.Deferred.fromCoroutine(self._request("GET", target, headers, None))

    def post_form(self, fields: dict[str, str], cookie: str | None = None,
                  origin: str | None = "", referer: str | None = None,
                  query: str = "", extra: dict[str, str] | None = None,
                  path: str = "/voip/get-callback/",
                  ) -> defer.Deferred[tuple[int, str, dict[str, str]]]:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(extra or {})}
        if cookie:
            headers["Cookie"] = f"sessionid={cookie}"
        if origin is not None:
            headers["Origin"] = origin or self.origin
        if referer is not None:
            headers["Referer"] = referer
        target = self.origin + path + (f"?{query}" if query else "")
        return defer.Deferred.fromCoroutine(
            self._request("POST", target, headers, urlencode(fields).encode()))

    def post_json(self, body: object, bearer: str | None = None, cookie: str | None = None,
                  raw: bytes | None = None,
                  ) -> defer.Deferred[tuple[int, str, dict[str, str]]]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if cookie:
            headers["Cookie"] = f"sessionid={cookie}"
        data = raw if raw is not None else json.dumps(body).encode()
        return defer.Deferred.fromCoroutine(self._request("POST", self.url, headers, data))

    def call_form(self, number: str = CLIENT) -> dict[str, str]:
        return {"callerid": str(self.connection), "to_number": number}

    def dialled(self) -> list[Mapping[str, str]]:
        return [r.params for r in self.fake.requests if r.path == "/v1/request/callback/"]

    def recorded(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT user_id, login, connection_id, number_given, number_dialled, result,"
            " http_status FROM dpvoip.callback_request ORDER BY id")


class PageTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_the_popup_shows_the_number_and_the_users_connections_and_dials_nothing(
            self) -> Any:
        cookie = self.sign_in()
        code, page, headers = yield self.get(f"number={CLIENT}", cookie)
        self.assertEqual(code, 200)
        self.assertIn("text/html", headers["content-type"])
        self.assertIn(f"value='{CLIENT}'", page)
        self.assertIn(f"<option value='{self.connection}'>Anna desk (Zadarma)</option>", page)
        self.assertIn("method='post'", page)
        self.assertIn("frame-ancestors 'self'", headers["content-security-policy"])
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_a_get_carrying_every_field_of_a_call_still_never_dials(self) -> Any:
        cookie = self.sign_in()
        query = urlencode({"number": CLIENT, **self.call_form()})
        code, _, _ = yield self.get(query, cookie)
        self.assertEqual(code, 200)
        self.assertEqual(self.dialled(), [])
        self.assertEqual(self.recorded(), [])

    @defer.inlineCallbacks
    def test_json_lists_the_active_connections_of_this_user_only(self) -> Any:
        self.crm.insert("voip_connection", type="sip", active=False, number="101",
                        callerid="old", provider="Zadarma", owner_id=self.anna)
        other = self.crm.user("bob", password=PASSWORD)
        self.crm.insert("voip_connection", type="pbx", active=True, number="102",
                        callerid="Bob", provider="Zadarma", owner_id=other)
        code, body, _ = yield self.get(f"number={CLIENT}", self.sign_in(),
                                       accept="application/json")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {
            "number": CLIENT, "user": "anna",
            "connections": [{"id": self.connection, "type": "pbx", "number": "100",
                             "callerid": "Anna desk", "provider": "Zadarma"}]})

    @defer.inlineCallbacks
    def test_a_user_without_a_connection_gets_the_crms_own_text(self) -> Any:
        bob = self.crm.user("bob", password=PASSWORD)
        code, body, _ = yield self.get(f"number={CLIENT}", self.sign_in(bob))
        self.assertEqual((code, body), (200, "You do not have a VoiP connection configured. "
                                             "Please contact your administrator."))

    @defer.inlineCallbacks
    def test_nobody_signed_in_gets_a_sign_in_hint(self) -> Any:
        code, page, _ = yield self.get(f"number={CLIENT}")
        self.assertEqual(code, 401)
        self.assertIn("/admin/login/?next=%2Fvoip%2Fget-callback%2F%3Fnumber%3D6912345678",
                      page)
        code, body, _ = yield self.get(f"number={CLIENT}", accept="application/json")
        self.assertEqual(code, 401)
        self.assertTrue(json.loads(body)["login_url"].startswith("/admin/login/?next="))


class DialTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_the_popup_form_dials_through_zadarma_signed_as_zadarma_checks(self) -> Any:
        code, body, _ = yield self.post_form(self.call_form("210 123 4567"), self.sign_in())
        self.assertEqual((code, body), (200, "Expect a call to your smartphone"))
        [sent] = [r for r in self.fake.requests if r.path == "/v1/request/callback/"]
        self.assertTrue(sent.authorized)
        self.assertEqual(sent.query, "from=100&to=%2B302101234567")
        self.assertEqual(self.recorded(), [
            (self.anna, "session", self.connection, "210 123 4567", "+302101234567",
             "dialled", 200)])

    @defer.inlineCallbacks
    def test_json_in_json_out_with_sip_and_predicted(self) -> Any:
        code, body, _ = yield self.post_json(
            {"connection": self.connection, "number": "+30 691 234 5678", "sip": "100",
             "predicted": True}, bearer=self.jwt())
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {"ok": True, "message":
                                            "Expect a call to your smartphone",
                                            "number": "+306912345678"})
        self.assertEqual(self.dialled(), [{"from": "100", "to": "+306912345678",
                                           "sip": "100", "predicted": "1"}])

    @defer.inlineCallbacks
    def test_fields_only_in_the_query_string_of_a_post_do_not_dial(self) -> Any:
        code, body, _ = yield self.post_form({}, self.sign_in(),
                                             query=urlencode(self.call_form()))
        self.assertEqual(code, 400)
        self.assertTrue(body.startswith("Error! "))
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_another_users_connection_is_refused(self) -> Any:
        bob = self.crm.user("bob", password=PASSWORD)
        code, body, _ = yield self.post_form(self.call_form(), self.sign_in(bob))
        self.assertEqual(code, 403)
        self.assertIn("not one of your active connections", body)
        self.crm.query("UPDATE voip_connection SET active = false RETURNING 1")
        code, _, _ = yield self.post_form(self.call_form(), self.sign_in())
        self.assertEqual(code, 403)
        self.assertEqual(self.dialled(), [])
        self.assertEqual([r[5:] for r in self.recorded()], [("refused", 403)] * 2)

    @defer.inlineCallbacks
    def test_premium_and_blocked_numbers_are_never_dialled(self) -> Any:
        cookie = self.sign_in()
        for number in ("+30 901 123 4567", "+44 909 876 0000", "+355 4 222 3456", "12"):
            code, body, _ = yield self.post_form(self.call_form(number), cookie)
            self.assertEqual(code, 400, number)
            self.assertTrue(body.startswith("Error! "), body)
        self.assertEqual(self.dialled(), [])
        self.assertEqual([r[5] for r in self.recorded()], ["refused"] * 4)


class OriginTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_a_cookie_post_from_a_foreign_site_is_refused(self) -> Any:
        cookie = self.sign_in()
        for origin, referer in (("https://evil.example", None), (None, None),
                                (None, "https://evil.example/page"), ("null", None)):
            code, body, _ = yield self.post_form(self.call_form(), cookie, origin=origin,
                                                 referer=referer)
            self.assertEqual(code, 403, (origin, referer))
            self.assertIn("CRM's own pages", body)
        self.assertEqual(self.dialled(), [])
        self.assertEqual(len(self.recorded()), 4)

    @defer.inlineCallbacks
    def test_the_referer_of_the_crms_own_page_is_enough(self) -> Any:
        code, _, _ = yield self.post_form(self.call_form(), self.sign_in(), origin=None,
                                          referer=self.origin + "/admin/crm/contact/7/")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_a_bearer_token_needs_no_origin(self) -> Any:
        code, _, _ = yield self.post_json({"connection": self.connection, "number": CLIENT},
                                          bearer=self.jwt())
        self.assertEqual(code, 200)


class ProxiedOriginTests(ClickToCallCase):
    """Behind the CRM's reverse proxy, which may rewrite Host to dpvoip's own address."""

    CRM = "https://crm.example.com"

    @defer.inlineCallbacks
    def test_the_browsers_own_same_origin_mark_is_enough(self) -> Any:
        code, _, _ = yield self.post_form(self.call_form(), self.sign_in(), origin=self.CRM,
                                          extra={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_the_forwarded_host_with_or_without_the_default_port(self) -> Any:
        cookie = self.sign_in()
        for forwarded, origin in (("crm.example.com:443", self.CRM),
                                  ("crm.example.com", self.CRM + ":8443"),
                                  ("CRM.example.com", self.CRM)):
            code, _, _ = yield self.post_form(self.call_form(), cookie, origin=origin,
                                              extra={"X-Forwarded-Host": forwarded})
            self.assertEqual(code, 200, (forwarded, origin))
        self.assertEqual(len(self.dialled()), 3)

    @defer.inlineCallbacks
    def test_a_cross_site_post_stays_refused_behind_the_proxy(self) -> Any:
        cookie = self.sign_in()
        for extra in ({"Sec-Fetch-Site": "cross-site"},
                      {"X-Forwarded-Host": "crm.example.com:8443"},
                      {"Sec-Fetch-Site": "same-site"}):
            code, _, _ = yield self.post_form(self.call_form(), cookie, origin=self.CRM,
                                              extra=extra)
            self.assertEqual(code, 403, extra)
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_basic_auth_of_a_proxy_does_not_hide_the_session(self) -> Any:
        code, _, _ = yield self.post_form(self.call_form(), self.sign_in(),
                                          extra={"Authorization": "Basic YWRtaW46cHc="})
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_the_path_without_its_slash_works_too(self) -> Any:
        code, _, _ = yield self.post_form(self.call_form(), self.sign_in(),
                                          path="/voip/get-callback")
        self.assertEqual(code, 200)


class OddInputTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_a_number_pasted_with_non_breaking_spaces_is_dialled(self) -> Any:
        code, body, _ = yield self.post_form(self.call_form("210\u00a0123\u00a04567"),
                                             self.sign_in())
        self.assertEqual((code, body), (200, "Expect a call to your smartphone"))
        self.assertEqual(self.recorded()[-1][3], "210\u00a0123\u00a04567")

    @defer.inlineCallbacks
    def test_odd_fields_are_400s_and_recorded(self) -> Any:
        cookie = self.sign_in()
        for form in ({"callerid": "\u00b2", "to_number": CLIENT},
                     {"callerid": "\u0661", "to_number": CLIENT},
                     {"callerid": str(self.connection), "to_number": "69\x00123"},
                     {"callerid": str(self.connection), "to_number": "\u03c4\u03b7\u03bb."}):
            code, body, _ = yield self.post_form(form, cookie)
            self.assertEqual(code, 400, form)
            self.assertTrue(body.startswith("Error! "))
        self.assertEqual([r[5:] for r in self.recorded()], [("refused", 400)] * 4)
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_odd_json_is_a_400_never_a_500(self) -> Any:
        token = self.jwt()
        for raw in (b"[" * 30000, b"\xff", b"[1]", b'{"connection": "\u00b2", "number": "1"}',
                    b'{"connection": true, "number": "1"}', b'{"connection": 1}'):
            code, body, _ = yield self.post_json(None, bearer=token, raw=raw)
            self.assertIn(code, (400, 403), raw[:40])
            self.assertIn("error", json.loads(body))
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_a_flood_of_anonymous_posts_is_cut_off_and_not_all_recorded(self) -> Any:
        codes = []
        for _ in range(25):
            code, _, _ = yield self.post_form(self.call_form())
            codes.append(code)
        self.assertEqual(codes, [401] * 20 + [429] * 5)
        self.assertEqual(len(self.recorded()), 20)


class AllowedOriginTests(ClickToCallCase):
    allowed_origins = ("https://crm.example",)

    @defer.inlineCallbacks
    def test_only_the_configured_origins_count_when_some_are_set(self) -> Any:
        cookie = self.sign_in()
        code, _, _ = yield self.post_form(self.call_form(), cookie)  # own host: not listed
        self.assertEqual(code, 403)
        code, _, _ = yield self.post_form(self.call_form(), cookie,
                                          origin="https://crm.example")
        self.assertEqual(code, 200)


class LoginTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_an_expired_session_is_refused(self) -> Any:
        cookie = self.sign_in(expires="now() - interval '1 minute'")
        code, body, _ = yield self.post_form(self.call_form(), cookie)
        self.assertEqual(code, 401)
        self.assertIn("expired", body)
        self.assertEqual(self.dialled(), [])
        self.assertEqual(self.recorded()[0][:2], (None, "none"))

    @defer.inlineCallbacks
    def test_a_session_from_before_a_password_change_is_refused(self) -> Any:
        cookie = self.sign_in()
        self.crm.query("UPDATE auth_user SET password = 'pbkdf2_sha256$870000$x$new='"
                       " RETURNING 1")
        code, body, _ = yield self.post_form(self.call_form(), cookie)
        self.assertEqual(code, 401)
        self.assertIn("password changed", body)

    @defer.inlineCallbacks
    def test_a_tampered_or_unknown_cookie_is_refused(self) -> Any:
        cookie = self.sign_in()
        self.crm.query("UPDATE django_session SET session_data ="
                       " replace(session_data, ':', 'x:') RETURNING 1")
        code, body, _ = yield self.post_form(self.call_form(), cookie)
        self.assertEqual((code, body), (401, "Error! the CRM session is not valid (bad "
                                             "session signature)"))
        code, body, _ = yield self.post_form(self.call_form(), "0" * 32)
        self.assertEqual(code, 401)
        self.assertIn("expired or was signed out", body)
        code, body, _ = yield self.post_form(self.call_form(), "../../etc")
        self.assertEqual(code, 401)
        self.assertIn("malformed", body)
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_an_inactive_users_session_is_refused(self) -> Any:
        cookie = self.sign_in()
        self.crm.query("UPDATE auth_user SET is_active = false RETURNING 1")
        code, body, _ = yield self.post_form(self.call_form(), cookie)
        self.assertEqual(code, 401)
        self.assertIn("not active", body)

    @defer.inlineCallbacks
    def test_expired_foreign_and_refresh_jwts_are_refused(self) -> Any:
        call = {"connection": self.connection, "number": CLIENT}
        for token, reason in ((self.jwt(exp=int(time.time()) - 5), "expired"),
                              (self.jwt(key="another-key" * 4), "signature"),
                              (self.jwt(token_type="refresh"), "not an access token")):
            code, body, _ = yield self.post_json(call, bearer=token)
            self.assertEqual(code, 401, body)
            self.assertIn(reason, json.loads(body)["error"])
        self.assertEqual(self.dialled(), [])

    @defer.inlineCallbacks
    def test_a_dpvoip_token_works_until_it_is_revoked(self) -> Any:
        token_id, token = yield defer.Deferred.fromCoroutine(
            create_token(self.daemon.store, "public", "anna", "script"))
        stored = self.crm.query("SELECT token_sha256 FROM dpvoip.api_token")
        self.assertNotIn(token, str(stored))
        call = {"connection": self.connection, "number": CLIENT}
        code, _, _ = yield self.post_json(call, bearer=token)
        self.assertEqual(code, 200)
        self.assertEqual(self.recorded()[-1][:2], (self.anna, "token"))
        yield defer.Deferred.fromCoroutine(revoke_token(self.daemon.store, token_id))
        code, body, _ = yield self.post_json(call, bearer=token)
        self.assertEqual(code, 401)
        self.assertIn("revoked", body)


class LimitTests(ClickToCallCase):
    click = replace(ClickToCallSettings(), per_user_per_minute=3)

    @defer.inlineCallbacks
    def test_the_fourth_call_in_a_minute_is_refused_with_retry_after(self) -> Any:
        cookie = self.sign_in()
        codes = []
        for _ in range(4):
            code, _, headers = yield self.post_form(self.call_form(), cookie)
            codes.append(code)
        self.assertEqual(codes, [200, 200, 200, 429])
        self.assertTrue(1 <= int(headers["retry-after"]) <= 60)
        self.assertEqual(len(self.dialled()), 3)
        # another user has a budget of their own
        bob = self.crm.user("bob", password=PASSWORD)
        bobs = self.crm.insert("voip_connection", type="pbx", active=True, number="101",
                               callerid="Bob", provider="Zadarma", owner_id=bob)
        code, _, _ = yield self.post_form({"callerid": str(bobs), "to_number": CLIENT},
                                          self.sign_in(bob))
        self.assertEqual(code, 200)


class ZadarmaFailureTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_zadarmas_error_is_a_502_with_its_message(self) -> Any:
        self.fake.fail_next(Fault.error("Wrong phone number", code=400))
        code, body, _ = yield self.post_form(self.call_form(), self.sign_in())
        self.assertEqual((code, body), (502, "Error! Wrong phone number"))
        self.assertEqual(self.recorded()[-1][5:], ("refused", 502))

    @defer.inlineCallbacks
    def test_zadarmas_rate_limit_is_a_429(self) -> Any:
        reset = int(time.time()) + 30
        self.fake.fail_next(Fault.rate_limited(reset))
        sent = time.time()
        code, _, headers = yield self.post_form(self.call_form(), self.sign_in())
        answered = time.time()
        self.assertEqual(code, 429)
        # the seconds left until Zadarma's reset, whenever the daemon read its clock
        self.assertTrue(reset - answered - 1 <= int(headers["retry-after"]) <= reset - sent + 1,
                        (reset - answered, headers["retry-after"], reset - sent))

    @defer.inlineCallbacks
    def test_an_answer_that_is_not_json_is_a_502(self) -> Any:
        self.fake.fail_next(Fault.html())
        code, body, _ = yield self.post_form(self.call_form(), self.sign_in())
        self.assertEqual(code, 502)
        self.assertIn("no JSON", body)


class SilentZadarmaTests(ClickToCallCase):
    api_timeout = 1.0  # reached by a hang only, however loaded the machine

    @defer.inlineCallbacks
    def test_a_silent_zadarma_is_a_504_at_the_configured_deadline(self) -> Any:
        # How long the wait takes is the clock's business (test_zadarma_api drives it
        # with a Clock); here: the answer, and that the deadline used is the setting.
        self.fake.fail_next(Fault.hang())
        code, body, _ = yield self.post_json({"connection": self.connection,
                                              "number": CLIENT}, bearer=self.jwt())
        self.assertEqual(code, 504)
        self.assertIn(f"within {self.api_timeout:g} s", body)
        self.assertEqual(self.recorded()[-1][5:], ("refused", 504))


class TlsTests(TestCase):
    """The daemon's API client verifies the server's name with service-identity."""

    timeout = 2 * PATIENCE  # a hang detector

    def setUp(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dpvoip-tls-"))
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.authority = make_authority()
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        anna = self.crm.user("anna", password=PASSWORD)
        self.connection = self.crm.insert(
            "voip_connection", type="pbx", active=True, number="100", callerid="Anna",
            provider="Zadarma", owner_id=anna)
        self.token = forge_jwt(access_claims(user_id=str(anna), exp=int(time.time()) + 300),
                               SECRET_KEY)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)

    async def _dial_through(self, names: tuple[str, ...], host: str) -> tuple[int, str, int]:
        files = self.authority.issue(dns_names=names).write(self.folder / host)
        fake = ZadarmaFake(KEY, API_SECRET, reactor)
        self.addCleanup(fake.close)
        port = await fake.listen(reactor, files.endpoint_description())
        config = in_process(
            self.dsn, crm=replace(CrmSettings(), secret_key=Secret(SECRET_KEY)),
            zadarma=replace(ZadarmaSettings(), key=Secret(KEY), secret=Secret(API_SECRET),
                            api_url=f"https://{host}:{port.getHost().port}",  # type: ignore[attr-defined]
                            api_ca_file=str(files.ca), api_timeout=60.0))
        daemon = build(config, reactor, scratch(self))
        daemon.service.startService()
        self.addCleanup(daemon.service.stopService)
        await daemon.service.started
        await eventually(lambda: daemon.schema.fired, PATIENCE)
        web = daemon.web.port.getHost().port  # type: ignore[union-attr]
        response = await treq.post(
            f"http://127.0.0.1:{web}/voip/get-callback/",
            json={"connection": self.connection, "number": CLIENT},
            headers=Headers({b"Authorization": [f"Bearer {self.token}".encode()]}),
            pool=self.http)
        body = (await response.content()).decode()
        return response.code, body, len([r for r in fake.requests
                                         if r.path == "/v1/request/callback/"])

    @defer.inlineCallbacks
    def test_a_certificate_for_the_right_name_is_accepted(self) -> Any:
        code, body, seen = yield defer.Deferred.fromCoroutine(
            self._dial_through(("localhost",), "localhost"))
        self.assertEqual((code, seen), (200, 1), body)

    @defer.inlineCallbacks
    def test_a_certificate_for_another_name_is_refused_and_nothing_is_sent(self) -> Any:
        code, body, seen = yield defer.Deferred.fromCoroutine(
            self._dial_through(("zadarma.test",), "localhost"))
        self.assertEqual((code, seen), (502, 0))
        self.assertIn("certificate", json.loads(body)["error"])


class RecordingTests(ClickToCallCase):
    def recording_url(self, call: object) -> str:
        return f"{self.origin}/voip/calls/{call}/recording"

    def call_with_recording(self, recording: str) -> int:
        self.crm.query(
            "INSERT INTO dpvoip.call_detail (call_id, source, direction, started_at,"
            " recording, extension) VALUES ('zd-in_1', 'zadarma', 'incoming', now(), %s,"
            " 100) RETURNING 1",  # taken by extension 100, Anna's connection
            (recording,))
        return self.crm.insert("accounting_voipcall", call_id="zd-in_1",
                               direction="incoming", phone_number=CLIENT, status="completed",
                               started_at=time.strftime("%Y-%m-%d %H:%M:%S+00",
                                                        time.gmtime()))

    @defer.inlineCallbacks
    def test_a_signed_in_user_is_sent_to_a_fresh_link(self) -> Any:
        self.fake.add_recording("in_1", "1700000000.123")
        call = self.call_with_recording("1700000000.123")
        code, _, headers = yield self.get(url=self.recording_url(call), cookie=self.sign_in())
        self.assertEqual(code, 302)
        self.assertTrue(headers["location"].endswith("1700000000.123.mp3"))
        code, _, headers = yield self.get(url=self.recording_url("zd-in_1"), bearer=self.jwt())
        self.assertEqual(code, 302)

    @defer.inlineCallbacks
    def test_a_recording_zadarma_no_longer_has_is_404(self) -> Any:
        call = self.call_with_recording("1700000000.999")
        code, body, _ = yield self.get(url=self.recording_url(call), bearer=self.jwt())
        self.assertEqual(code, 404)
        self.assertIn("no longer has", body)
        code, _, _ = yield self.get(url=self.recording_url("%C2%B2"), bearer=self.jwt())
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_a_call_without_recording_is_404_and_nobody_signed_in_401(self) -> Any:
        call = self.call_with_recording("")
        url = self.recording_url(call)
        code, _, _ = yield self.get(url=url, cookie=self.sign_in())
        self.assertEqual(code, 404)
        code, _, _ = yield self.get(url=url)
        self.assertEqual(code, 401)
        self.assertEqual([r.path for r in self.fake.requests
                          if r.path.startswith("/v1/pbx/record")], [])


class AccountZoneTests(ClickToCallCase):
    @defer.inlineCallbacks
    def test_the_account_zone_is_asked_from_zadarma_at_start(self) -> Any:
        yield eventually(lambda: self.daemon.account.zone_stated is not None, PATIENCE)
        self.assertEqual(self.daemon.account.zone_stated, "UTC+3")
        # the office zone when it is at +3 now (summer in Athens), else a fixed +3
        zone = self.daemon.zadarma.context.zone
        self.assertEqual(datetime.now(zone).utcoffset(), timedelta(hours=3))
        self.assertIn("/v1/info/timezone/", [r.path for r in self.fake.requests])


class DeadStore:
    """A store whose database is gone (``error``), or refuses every statement."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.statements: list[str] = []

    def read(self, sql: str, params: Any = None) -> defer.Deferred[list[tuple[Any, ...]]]:
        self.statements.append(sql)
        return defer.fail(self.error)

    write_one = read

    def batch(self, steps: Any) -> defer.Deferred[Any]:
        """A transaction (a click's claim) on a database that is gone: it never begins."""
        self.statements.append("a transaction")
        return defer.fail(self.error)


class DatabaseDownTests(SynchronousTestCase):
    """In memory: the CRM's database failing is a 503 (try again shortly), whichever the
    request, and never taken for a refused login or a missing recording."""

    token = "dpv_" + "a" * 43

    def pages(self, error: Exception) -> CallbackPages:
        store: Any = DeadStore(error)
        clock = Clock()
        logins = Logins(Accounts(store, "public"), Secret(SECRET_KEY), Secret(""), "sessionid",
                        clock)
        # The database fails before the policy or Zadarma would be asked.
        calls = ClickToCall(CallbackRecords(store, "public"), None, None,  # type: ignore[arg-type]
                            Dialling("GR"), 5, clock)
        return CallbackPages(logins, calls, (), "/login/", clock)

    def request(self, body: bytes | None = None, bearer: bool = True) -> Request:
        """A request as the Site hands it over (no transport behind it)."""
        request = Request(DummyChannel())
        request.method, request.uri, request.args = b"GET", b"/voip/get-callback/", {}
        request.received_cookies = {}
        if bearer:
            request.requestHeaders.setRawHeaders(b"Authorization",
                                                 [f"Bearer {self.token}".encode()])
        else:
            request.received_cookies[b"sessionid"] = b"0123456789abcdef0123456789abcdef"
        request.requestHeaders.setRawHeaders(b"Accept", [b"application/json"])
        if body is not None:
            request.method = b"POST"
            request.requestHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
            request.content = io.BytesIO(body)
        return request

    def test_the_page_answers_503_for_a_token_or_a_session(self) -> None:
        for bearer in (True, False):
            pages = self.pages(ConnectionDead())
            done = defer.Deferred.fromCoroutine(pages.page(self.request(bearer=bearer)))
            failure = self.failureResultOf(done, HttpError)
            self.assertEqual((failure.value.status, failure.value.message),
                             (503, "the CRM database is not reachable; try again shortly"))

    def test_a_dial_answers_503_in_json_and_nothing_is_dialled(self) -> None:
        for error in (ConnectionDead(), psycopg2.OperationalError("the server closed"),
                      psycopg2.ProgrammingError("relation does not exist")):
            request = self.request(json.dumps({"connection": 1, "number": CLIENT}).encode())
            pages = self.pages(error)
            body = self.successResultOf(defer.Deferred.fromCoroutine(pages.dial(request)))
            self.assertEqual(request.code, 503)
            self.assertEqual(json.loads(body)["error"],
                             "the CRM database is not reachable; try again shortly")

    def test_a_recording_link_answers_503(self) -> None:
        pages = self.pages(ConnectionDead())
        done = defer.Deferred.fromCoroutine(pages.recording(self.request(), "123"))
        self.assertEqual(self.failureResultOf(done, HttpError).value.status, 503)

    def test_the_services_say_database_unreachable_and_let_other_errors_through(
            self) -> None:
        store: Any = DeadStore(psycopg2.OperationalError("could not connect\nDETAIL: x"))
        calls = ClickToCall(CallbackRecords(store, "public"), None, None,  # type: ignore[arg-type]
                            Dialling("GR"), 5, Clock())
        user = CrmUser(7, "anna", "Anna Papa", "jwt")
        failure = self.failureResultOf(
            defer.Deferred.fromCoroutine(calls.connections(user)), DatabaseUnreachable)
        self.assertEqual(str(failure.value), "could not connect")
        self.assertIn("voip_connection", store.statements[0])
        store.error = ValueError("not the database's")
        self.failureResultOf(defer.Deferred.fromCoroutine(calls.recording_link(user, "12")),
                             ValueError)


# -- the per-user limit, shared by every instance on the database ---------------------------


class WindowRuleTests(SynchronousTestCase):
    """``window_wait``, the limit's rule, on plain data: the times any instance counted."""

    def test_below_the_limit_a_request_is_allowed(self) -> None:
        self.assertIsNone(window_wait([], 1000.0, 3))
        self.assertIsNone(window_wait([990.0, 995.0], 1000.0, 3))

    def test_at_the_limit_the_wait_ends_a_window_after_the_oldest(self) -> None:
        self.assertEqual(window_wait([950.0, 960.0, 990.0], 1000.0, 3), 10.0)
        # exactly a window after the oldest it no longer counts
        self.assertIsNone(window_wait([940.0, 960.0, 990.0], 1000.0, 3))
        oldest = 940.0 + 1e-9
        wait = window_wait([oldest, 960.0, 990.0], 1000.0, 3)
        assert wait is not None
        self.assertTrue(wait > 0 and 1000.0 + wait >= oldest + 60.0)  # waiting is enough

    def test_more_than_the_limit_counted_waits_until_enough_have_left(self) -> None:
        # two hosts' clocks apart: five counted in the window, limit 3: the third oldest
        # must leave before one more is allowed
        self.assertEqual(window_wait([945.0, 950.0, 955.0, 960.0, 970.0], 1000.0, 3), 15.0)

    def test_a_time_ahead_counts_unless_a_window_ahead(self) -> None:
        self.assertEqual(window_wait([1010.0, 1020.0, 1030.0], 1000.0, 3), 70.0)
        # a clock set back by more than a window: those times mean nothing now
        self.assertIsNone(window_wait([1060.0, 1070.0, 1080.0], 1000.0, 3))


class SharedLimitContract(_Case):
    """What every ``CallbackStore``'s ``claim`` and ``record`` do (``MemoryCallbacks`` and
    ``CallbackRecords`` on PostgreSQL alike): the limit of 3 a minute for user 7."""

    store: Any
    T0 = 1_750_000_000.0

    def rows(self) -> list[tuple[Any, ...]]:
        """(user, result, http status, message) of every request kept, in order."""
        raise NotImplementedError

    def claim(self, at: float, user: int = 7) -> defer.Deferred[Any]:
        async def claimed() -> Any:
            return await self.store.claim(
                CallbackRequest(user, "jwt", 1, None, CLIENT, None, "refused", 0, ""),
                at, WINDOW, lambda counted: window_wait(counted, at, 3))
        return defer.Deferred.fromCoroutine(claimed())

    @defer.inlineCallbacks
    def test_three_claims_a_minute_the_fourth_waits_and_nothing_is_kept_for_it(self) -> Any:
        claims = []
        for offset in (0, 10, 20, 30):
            claims.append((yield self.claim(self.T0 + offset)))
        self.assertEqual([c.wait for c in claims], [None, None, None, 30.0])
        self.assertIsNone(claims[3].request_id)
        self.assertEqual(len({c.request_id for c in claims[:3]}), 3)
        self.assertEqual(self.rows(), [(7, PENDING, 0, PENDING_MESSAGE)] * 3)
        # another user counts apart; a window after the first claim there is room again
        self.assertIsNone((yield self.claim(self.T0 + 30, user=8)).wait)
        self.assertIsNone((yield self.claim(self.T0 + 60)).wait)
        self.assertEqual((yield self.claim(self.T0 + 61)).wait, 9.0)

    @defer.inlineCallbacks
    def test_the_outcome_is_written_over_its_claim_which_stays_counted(self) -> Any:
        first = yield self.claim(self.T0)
        yield defer.Deferred.fromCoroutine(self._record(first.request_id))
        yield defer.Deferred.fromCoroutine(self._record(None))  # a request never counted
        self.assertEqual(self.rows(), [(7, "dialled", 200, "Expect a call"),
                                       (7, "refused", 429, "too many")])
        yield self.claim(self.T0 + 1)
        yield self.claim(self.T0 + 2)
        self.assertEqual((yield self.claim(self.T0 + 3)).wait, 57.0)

    async def _record(self, claimed: int | None) -> None:
        ok = claimed is not None
        await self.store.record(CallbackRequest(
            7, "jwt", 1, "100", CLIENT, "+306912345678" if ok else None,
            "dialled" if ok else "refused", 200 if ok else 429,
            "Expect a call" if ok else "too many"), claimed)

    @defer.inlineCallbacks
    def test_claims_made_at_once_are_taken_one_at_a_time(self) -> Any:
        claims = yield defer.gatherResults([self.claim(self.T0 + n / 10) for n in range(10)])
        self.assertEqual(sum(c.wait is None for c in claims), 3)
        self.assertEqual(len(self.rows()), 3)

    @defer.inlineCallbacks
    def test_a_clock_set_back_by_more_than_a_window_is_not_locked_out(self) -> Any:
        for offset in (500, 501, 502):
            yield self.claim(self.T0 + offset)
        self.assertIsNone((yield self.claim(self.T0)).wait)


class MemorySharedLimitTests(SharedLimitContract, TestCase):
    def setUp(self) -> None:
        self.store = MemoryCallbacks()

    def rows(self) -> list[tuple[Any, ...]]:
        return [(r.user_id, r.result, r.http_status, r.message) for r in self.store.records]


class PostgresSharedLimitTests(SharedLimitContract, TestCase):
    """On the real PostgreSQL, through a pool of four: concurrent claims really overlap."""

    timeout = 2 * PATIENCE

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 4)
        self.addCleanup(pool.close)
        database = Store(pool, reactor)
        self.store = CallbackRecords(database, "public")

        async def ready() -> None:
            await pool.start()
            await database.write(lambda c: prepare(c, standalone=False, crm_schema="public"))

        return defer.Deferred.fromCoroutine(ready())

    def rows(self) -> list[tuple[Any, ...]]:
        return self.crm.query("SELECT user_id, result, http_status, message"
                              " FROM dpvoip.callback_request ORDER BY id")

    @defer.inlineCallbacks
    def test_the_count_is_the_databases_not_this_processs(self) -> Any:
        # what another instance counted a moment ago (its row, its clock) counts here
        self.crm.query(
            "INSERT INTO dpvoip.callback_request (user_id, login, number_given, result,"
            " http_status, counted_at) SELECT 7, 'jwt', '1', 'dialled', 200,"
            " to_timestamp(%s) FROM generate_series(1, 3) RETURNING 1", (self.T0 - 5,))
        self.assertEqual((yield self.claim(self.T0)).wait, 55.0)
